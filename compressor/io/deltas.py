"""Seeing an expert as a task vector against a base, tensor by tensor.

An expert may be a full model (τ = θt − θ0), a stored task vector (τ as
stored), or a PEFT LoRA adapter (τ = B·A·scaling on the modules it adapts,
replacement − θ0 on its ``modules_to_save``, zero elsewhere). The checks here
are the ones every method needs: names and shapes line up; non-float tensors
present in one input only are carried from the base with a warning; a float
tensor present in one input only is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from compressor.errors import InputError, MismatchError, UsageError
from compressor.io.peft import PeftAdapter
from compressor.io.safetensors import TensorInfo
from compressor.io.sources import TensorSource, block_shape, row_blocks

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def _shape(info: TensorInfo) -> str:
    return "[" + ", ".join(str(d) for d in info.shape) + "]"


class TaskVectorView:
    """The task vector of ``expert`` relative to ``base``; ``delta(name)`` is float32.

    ``own``: float tensors the expert may hold that the base does not (its own
    classification head, which aTLAS takes as it is); any other is a mismatch."""

    def __init__(
        self,
        base: TensorSource,
        expert: TensorSource,
        warn: Callable[[str], None],
        own: frozenset[str] = frozenset(),
    ):
        self.base = base
        self.expert = expert
        self.warn = warn
        self.own = own
        if isinstance(expert, PeftAdapter):
            self._check_adapter()
        else:
            self._check_tensors()

    def _check_tensors(self) -> None:
        base, expert = self.base.infos(), self.expert.infos()
        bl, el = self.base.label, self.expert.label
        notes = []  # warnings, given only when nothing is wrong
        for name, e in expert.items():
            b = base.get(name)
            if b is None and name in self.own:
                continue
            if b is None:
                if e.is_float:
                    raise MismatchError(
                        f"base and expert differ: {name} is in {el} but not in {bl}"
                    )
                notes.append(f"{name} (non-float) is only in {el}; it is left out")
            elif b.is_float != e.is_float or _is_float8(b) != _is_float8(e):
                raise MismatchError(
                    f"base and expert differ: {name} is {b.dtype} in {bl} and {e.dtype} in {el}"
                    + (
                        " (a float8 checkpoint is quantized: dequantize it first)"
                        if _is_float8(b) or _is_float8(e)
                        else ""
                    )
                )
            elif b.shape != e.shape:
                raise MismatchError(
                    f"base and expert differ: {name} is {_shape(b)} in {bl} and {_shape(e)} in {el}"
                )
        for name, b in base.items():
            if name not in expert:
                if b.is_float:
                    raise MismatchError(
                        f"base and expert differ: {name} is in {bl} but not in {el}"
                    )
                notes.append(f"{name} (non-float) is only in {bl}; carried from the base")
        for note in notes:
            self.warn(note)

    def _check_adapter(self) -> None:
        base = self.base.infos()
        adapter: PeftAdapter = self.expert
        for name, module in adapter.modules.items():
            b = base.get(name)
            if b is None:
                raise MismatchError(
                    f"adapter {adapter.label} adapts '{name}', which {self.base.label} does not have"
                )
            if b.shape != module.shape:
                raise MismatchError(
                    f"base and adapter differ: {name} is {_shape(b)} in {self.base.label} "
                    f"and the adapter's update is [{', '.join(map(str, module.shape))}]"
                )
        for name, key in adapter.replaced.items():
            b = base.get(name)
            e = adapter.info(key)
            if b is None or b.shape != e.shape:
                raise MismatchError(
                    f"adapter {adapter.label} replaces '{name}', which {self.base.label} "
                    "does not have with that shape"
                )

    def delta(
        self, name: str, rows: slice | None = None, base_block: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """τ for one float tensor of the base (or some of its rows); None where τ is zero.

        ``base_block`` is the same rows of the base in float32, when the caller
        has read them already.
        """

        expert = self.expert

        def base_rows() -> torch.Tensor:
            return base_block if base_block is not None else self.base.get(name, rows).float()

        if isinstance(expert, PeftAdapter):
            if name in expert.modules:
                d = expert.delta(name, rows)
            else:
                key = expert.replaced.get(name)
                if key is None:
                    return None
                d = expert.get(key, rows).float() - base_rows()
        elif expert.content == "delta":
            d = expert.get(name, rows).float()
        else:
            d = expert.get(name, rows).float().sub_(base_rows())
        if not all_finite(d):
            self._non_finite(name, rows)
        return d

    def _non_finite(self, name: str, rows: slice | None) -> None:
        """Name the input whose tensor holds NaN or inf (only on the error path)."""

        for source in (self.base, self.expert):
            if isinstance(source, PeftAdapter) or name not in source.infos():
                continue
            block = source.get(name, rows).float()
            if not all_finite(block):
                raise_non_finite(source.label, name, block)
        raise InputError(f"{self.expert.label}: the task vector of {name} holds NaN or inf values")

    def carried(self, name: str) -> torch.Tensor:
        """A non-float tensor: the expert's where it has one, else the base's."""
        if name in self.expert.infos() and not isinstance(self.expert, PeftAdapter):
            return self.expert.get(name)
        return self.base.get(name)

    def expert_dtype(self, name: str) -> torch.dtype | None:
        """The expert's own dtype for a tensor (None for deltas and adapters)."""
        if self.expert.content != "model" or isinstance(self.expert, PeftAdapter):
            return None
        return self.expert.info(name).dtype


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite. A finite sum proves it (NaN and inf propagate through
    addition) at a twentieth of the cost of testing each entry; only a sum that is not
    finite (NaN, inf, or an overflow of finite entries) is checked entry by entry."""
    import torch

    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def raise_non_finite(label: str, name: str, block: torch.Tensor) -> None:
    """One line naming a tensor that holds NaN or inf, with a count."""
    import torch

    bad = int((~torch.isfinite(block)).sum())
    raise InputError(
        f"{label}: tensor {name} holds {bad} NaN or infinite value{'s' if bad != 1 else ''}; "
        "a method cannot give meaningful results from it"
    )


class CompressionInput:
    """What a compress method reads: the float tensors of τ block by block, and the rest.

    A model with a base gives θt − θ0; a stored task vector gives itself; a PEFT
    adapter gives its A and B factors (reference 0, as in the paper), or with
    ``target delta`` and a base, ΔW = B·A·scaling on the base's tensor names.
    """

    def __init__(
        self,
        base: TensorSource | None,
        source: TensorSource,
        target: str,
        warn: Callable[[str], None],
        method: str,
    ):
        self.source = source
        self.view = None
        self.content = "delta"
        if source.content == "adapter" and target == "factors":
            self.infos = source.infos()
            self.content = "adapter"
            replaced = set(source.replaced.values())
            self.names = [n for n, i in self.infos.items() if i.is_float and n not in replaced]
            self.dense = [n for n in self.infos if n not in self.names]
            if replaced:
                warn(
                    f"kept dense (whole modules the adapter replaces): {', '.join(sorted(replaced))}"
                )
            return
        if source.content in ("model", "adapter"):
            if base is None:
                what = (
                    "a full model" if source.content == "model" else "an adapter with target delta"
                )
                raise UsageError(
                    f"{method} needs --base BASE when INPUT is {what} (or give a task vector)"
                )
            self.view = TaskVectorView(base, source, warn)
            self.infos = base.infos()
        else:
            self.infos = source.infos()
        self.names = [n for n, i in self.infos.items() if i.is_float]
        self.dense = [n for n, i in self.infos.items() if not i.is_float]

    def blocks(self, name: str):
        import torch

        info = self.infos[name]
        for rows in row_blocks(info):
            if self.view is None:
                block = self.source.get(name, rows).float()
                if not all_finite(block):
                    raise_non_finite(self.source.label, name, block)
                yield block
            else:
                d = self.view.delta(name, rows)
                yield d if d is not None else torch.zeros(block_shape(info, rows))

    def dense_tensor(self, name: str) -> torch.Tensor:
        return self.view.carried(name) if self.view is not None else self.source.get(name)


class ModelFromDelta(TensorSource):
    """A base plus a task vector, adapter or compressed expert, read as the full model.

    Each float tensor is θ0 + τ, computed block by block when read, in the fine-tune's
    dtype where the task vector recorded it (else the base's): what ``export --base``
    writes and ``eval --base`` runs, without a model written to disk. Files come from
    the expert where it has them, else from the base.
    """

    content = "model"

    def __init__(self, base: TensorSource, delta: TensorSource, warn: Callable[[str], None]):
        import torch

        self.base, self.delta = base, delta
        self.view = TaskVectorView(base, delta, warn)
        self.label = f"{delta.label} + {base.label}"
        self.manifest = {}
        self.files = {**base.files, **delta.files}
        dtypes = delta.manifest.get("dtypes", {})
        self._infos = {}
        for name, info in base.infos().items():
            if info.is_float and name in dtypes:
                dtype = getattr(torch, dtypes[name])
                info = TensorInfo(name, info.shape, dtype, 0, info.numel * dtype.itemsize)
            self._infos[name] = info

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        info = self._infos[name]
        if not info.is_float:
            t = self.view.carried(name)
            return t if rows is None else t[rows]
        block = self.base.get(name, rows).float()
        d = self.view.delta(name, rows, block)
        if d is not None:
            block += d
        return block.to(info.dtype)

    def verify(self) -> None:
        self.base.verify()
        self.delta.verify()

    def close(self) -> None:
        self.base.close()
        self.delta.close()


def _is_float8(info) -> bool:
    """Whether a tensor is stored in an 8-bit float (a quantized checkpoint's scale-less
    values: as far from its base's float32 as int8 would be)."""
    return info.dtype.is_floating_point and info.dtype.itemsize == 1


class ScaledDelta(TensorSource):
    """A base plus λ times a task vector held in memory (float32 tensors by name): the
    candidate models of ``-o scale auto``. Missing names read as the base's."""

    content = "model"

    def __init__(self, base: TensorSource, deltas: dict, scale: float):
        self.base, self.deltas, self.scale = base, deltas, scale
        self.label = base.label if not deltas else f"the merge at scale {scale:g}"
        self.files = base.files
        self.manifest = {}

    def infos(self) -> dict[str, TensorInfo]:
        return self.base.infos()

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        info = self.base.info(name)
        t = self.base.get(name, rows)
        delta = self.deltas.get(name)
        if delta is None or not info.is_float:
            return t
        d = delta if rows is None else delta[rows]
        return (t.float() + self.scale * d).to(info.dtype)
