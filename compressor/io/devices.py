"""Where tensor math runs: ``--device auto|cpu|cuda|cuda:N|mps`` (or ``COMPRESSOR_DEVICE``).

The request is kept as text and resolved on first use, so commands that compute nothing
(``store ls``) never import torch for it. ``auto`` takes CUDA when torch sees a GPU,
else the CPU. A device that is not there is a :class:`~compressor.errors.UsageError`
(one line, exit 2), raised before a run opens its inputs. Reading and writing stay on
the CPU and stream; methods move the tensors they work on (one tensor of every expert,
for a merge; one layer, for calibration) or the model they run to the device and the
results back. Random draws (DARE, DELLA, aTLAS's groups, NeuMeta's coordinate noise and
initialisation) come from CPU generators, so a seed gives the same draws on every device.
"""

from __future__ import annotations

import os

from compressor.errors import UsageError

_requested: str | None = None


def request(name: str | None) -> None:
    """Set the device this process's runs use (None: ``$COMPRESSOR_DEVICE``, else auto);
    also exported to ``$COMPRESSOR_DEVICE``, so a plan's worker processes use it too."""
    global _requested
    _requested = name
    if name is not None:
        os.environ["COMPRESSOR_DEVICE"] = name


def requested() -> str:
    return (_requested or os.environ.get("COMPRESSOR_DEVICE") or "auto").strip()


def resolve(name: str | None = None) -> str:
    """The torch device string for a request (default: this process's), or a UsageError."""
    name = requested() if name is None else name.strip()
    if name == "cpu":
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{name}' is not available: torch sees no CUDA device here")
        count = torch.cuda.device_count()
        if index and (not index.isdigit() or int(index) >= count):
            raise UsageError(
                f"device '{name}' is not available: torch sees {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        return name
    if kind == "mps" and not index:
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"device '{name}' is not available: torch sees no MPS device here")
        return name
    raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")


def describe(device: str) -> dict:
    """What the manifest records of the device a run used."""
    import torch

    out = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out
