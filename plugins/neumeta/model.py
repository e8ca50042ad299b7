"""A NeuMeta artifact as a model: its names, the generator it holds, and the decoded full width."""

from __future__ import annotations

from compressor.errors import InputError
from compressor.io.sources import DecodedSource, TensorSource

ENCODING = "neumeta"
SMOOTHING = ("greedy", "tsp", "none")


def _batch_norms(net) -> dict:
    """{module name: module} of every BatchNorm layer of ``net``."""
    import torch

    norm = torch.nn.modules.batchnorm._BatchNorm
    return {n: m for n, m in net.named_modules() if isinstance(m, norm)}


class NeumetaModel:
    """A trained NeuMeta artifact, opened: its parent, layout, generator and permutations."""

    def __init__(self, raw: TensorSource, device: str = "cpu"):
        from compressor.models.architectures import WidthLayout
        from compressor.plugins.neumeta.generator import WidthGenerator

        if raw.manifest.get("encoding") != ENCODING:
            raise InputError(
                f"{raw.label} is not a NeuMeta generator; train one with "
                "`compress train --plugin neumeta MODEL -o data PATH`"
            )
        m = raw.manifest
        self.raw = raw
        self.parent = raw.open_parent("input")
        self.layout = WidthLayout(self.parent)
        self.generator = WidthGenerator(
            self.layout, m["hidden"], m["depth"], m["fourier"], m.get("resample", "pool")
        )
        state = {k.removeprefix("inr."): raw.get(k) for k in raw.names() if k.startswith("inr.")}
        self.generator.load_state_dict(state)
        self.generator.requires_grad_(False).to(device)
        self.perms = {g: raw.get(f"perm.{g}").long() for g in self.layout.groups}
        self.scales = m["scales"]
        self.noise = float(m["noise"])

    def generate(self, name: str, widths: dict, samples: int = 1, gen=None):
        """A width tensor at ``widths`` (on the CPU; generated on the generator's device):
        clean coordinates, or the mean of ``samples`` generations with the training's
        coordinate noise (drawn from ``gen``, a CPU generator)."""
        import torch

        from compressor.plugins.neumeta.generator import permute

        spec = self.layout.tensors[name]
        src = permute(self.parent.get(name).float(), spec, self.perms)
        with torch.no_grad():
            if samples <= 1:
                return self.generator.tensor(spec, src, self.scales[name], widths).cpu()
            draws = [
                self.generator.tensor(spec, src, self.scales[name], widths, self.noise, gen)
                for _ in range(samples)
            ]
            return torch.stack(draws).mean(0).cpu()

    def close(self) -> None:
        self.parent.close()


class DecodedNeumeta(DecodedSource):
    """A NeuMeta artifact read back as its full-width model (clean coordinates)."""

    content = "model"

    def __init__(self, raw: TensorSource):
        super().__init__(raw)
        self.model = NeumetaModel(raw)
        self._infos = dict(self.model.parent.infos())

    def encoded(self, name: str) -> bool:
        return name in self.model.layout.tensors

    def get(self, name: str, rows: slice | None = None):
        if not self.encoded(name):
            return self.model.parent.get(name, rows)
        return super().get(name, rows)

    def _decode(self, name: str):
        full = self.model.layout.groups
        return self.model.generate(name, full).to(self._infos[name].dtype)

    def verify(self) -> None:
        self.raw.verify()
        self.model.parent.verify()

    def close(self) -> None:
        self.raw.close()
        self.model.close()
