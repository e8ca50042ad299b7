"""The safetensors file format: header parsing and raw tensor reads.

We parse the header ourselves rather than mmap the file through ``safe_open``:
a clear message for each kind of damage, and reads with ``readinto`` into a
fresh tensor keep the resident memory at one tensor (mapped pages of a
multi-GB shard would otherwise count against the process). The layout is the
one the safetensors library writes and reads: an 8-byte little-endian header
length, a JSON header, then the tensor bytes.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.io.integrity import open_read

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


@functools.cache
def dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype names -> torch dtypes (built on first use: torch loads lazily)."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
    }


@functools.cache
def dtype_names() -> dict[torch.dtype, str]:
    """torch dtypes -> safetensors dtype names."""
    return {v: k for k, v in dtypes().items()}


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap
MAX_TENSORS = 100_000  # the largest real checkpoints hold a few thousand tensors per file


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one stored tensor, and where its bytes lie."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0  # absolute offset of the first byte in the file
    nbytes: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def dtype_from_name(name: str) -> torch.dtype:
    """Map a user-facing dtype name (``bf16``, ``float32``, ``F16``) to torch."""
    aliases = {
        "fp32": "F32",
        "float32": "F32",
        "f32": "F32",
        "fp16": "F16",
        "float16": "F16",
        "f16": "F16",
        "half": "F16",
        "bf16": "BF16",
        "bfloat16": "BF16",
        "fp64": "F64",
        "float64": "F64",
    }
    key = aliases.get(name.lower(), name.upper())
    if key not in dtypes() or not dtypes()[key].is_floating_point:
        raise InputError(f"unknown dtype '{name}' (choose from bf16, fp16, fp32, fp64)")
    return dtypes()[key]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return tensor infos and metadata."""
    path = Path(path)
    try:
        f, size, _ = open_read(path, ahead=False)  # the header, then nothing
        with f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(
                    f"{path} is not a safetensors file or its header is truncated "
                    f"(header says {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    count = raw.count(b'"data_offsets"')
    if count > MAX_TENSORS:  # refuse before parsing: 1M entries would take a minute and GBs
        raise InputError(
            f"{path} lists {count} tensors; more than {MAX_TENSORS} in one file is not a "
            "real checkpoint"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except RecursionError:
        raise InputError(f"{path} is not a safetensors file: its header nests too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path} is not a safetensors file: corrupt header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(f"{path} has corrupt metadata: __metadata__ must map strings to strings")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = dtypes()[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if any(d < 0 for d in shape) or begin < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError, OverflowError):
            raise InputError(f"{path} has a corrupt header entry for tensor '{name}'") from None
        info = TensorInfo(name, shape, dtype, data_start + begin, end - begin)
        if info.nbytes != info.numel * dtype.itemsize or end < begin:
            raise InputError(f"{path}: tensor '{name}' has a size that does not match its shape")
        if data_start + end > size:
            raise InputError(
                f"{path} is truncated: tensor '{name}' ends at byte {data_start + end}, "
                f"file has {size}"
            )
        infos[name] = info
    ordered = sorted(infos.values(), key=lambda i: (i.offset, i.nbytes))
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.offset < prev.offset + prev.nbytes:
            raise InputError(
                f"{path} has overlapping tensors: '{prev.name}' and '{cur.name}' share bytes"
            )
    return {i.name: i for i in ordered}, metadata


def read_tensor(f, info: TensorInfo, rows: slice | None = None) -> torch.Tensor:
    """Read a tensor (or a range of its first dimension) from a
    :class:`compressor.io.integrity.HashedFile`, which hashes what it reads."""
    import torch

    shape = list(info.shape)
    offset, nbytes = info.offset, info.nbytes
    if rows is not None and shape:
        start, stop, _ = rows.indices(shape[0])
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        offset += start * row_bytes
        nbytes = (stop - start) * row_bytes
        shape[0] = stop - start
    buf = torch.empty(nbytes, dtype=torch.uint8)
    got = f.read_into(offset, buf)
    if nbytes and got != nbytes:
        raise InputError(f"{f.name} is truncated while reading '{info.name}'")
    return buf.view(info.dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy where possible."""
    import torch

    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_header(
    entries: list[TensorInfo], metadata: dict[str, str] | None, pad_to: int | None = None
) -> bytes:
    """Build the length prefix and JSON header for tensors laid out in order.

    Keys are sorted and the header is padded with spaces to a multiple of 8
    bytes (or to exactly ``pad_to`` bytes) so the same tensors always give the
    same bytes.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for e in entries:
        header[e.name] = {
            "dtype": dtype_names()[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * ((pad_to - len(raw)) if pad_to is not None else (-(len(raw) + 8) % 8))
    return struct.pack("<Q", len(raw)) + raw
