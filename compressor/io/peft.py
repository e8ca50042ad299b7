"""PEFT LoRA adapter directories as tensor sources.

The raw A/B factors are the adapter's tensors; :meth:`PeftAdapter.delta`
gives ΔW = B·A·scaling for one module under the base model's weight name (and,
with ``lora_bias``, Δb = lora_B.bias·scaling under its bias's name)
(scaling = lora_alpha / r, or lora_alpha / √r with rsLoRA; ``rank_pattern``
and ``alpha_pattern`` respected), without forming any other module's ΔW.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.io.integrity import read_checked
from compressor.io.safetensors import TensorInfo
from compressor.io.sources import SafetensorsShards, TensorSource, carried_files, directory_files

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: its factor tensors, layout and scaling."""

    weight: (
        str  # the base model's tensor name, e.g. "bert.encoder.layer.0.attention.self.query.weight"
    )
    a: str
    b: str
    layout: str  # linear | conv | embedding | bias (lora_B's bias, for the layer's bias)
    scaling: float
    transpose: bool  # fan_in_fan_out (GPT-2 Conv1D stores the weight as in x out)
    shape: tuple[int, ...]


def _pattern_value(patterns: dict, module: str, default, label: str = ""):
    for pattern, value in (patterns or {}).items():
        try:
            hit = re.fullmatch(rf"(.*\.)?{pattern}", module)
        except re.error:
            raise InputError(f"{label}: {CONFIG_FILE} has an invalid pattern '{pattern}'") from None
        if hit:
            return value
    return default


def _config_number(value, key: str, kind, what: str, label: str):
    """``value`` as ``kind`` (int or float), or an error naming the config key."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{label}: {CONFIG_FILE} key '{key}' must be {what}, not {value!r}")
    try:
        out = kind(value)
        if kind is float and not math.isfinite(out):
            raise ValueError
        return out
    except (ValueError, OverflowError):
        raise InputError(
            f"{label}: {CONFIG_FILE} key '{key}' must be {what}, not {value!r}"
        ) from None


class PeftAdapter(TensorSource):
    """A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    content = "adapter"

    def __init__(
        self,
        path: Path,
        files: dict[str, Path] | None = None,
        label: str | None = None,
        tensors: TensorSource | None = None,
        config: dict | None = None,
    ):
        """Read the adapter at ``path`` (or from ``files``); ``tensors`` replaces the
        weights file and ``config`` the config file when they come from elsewhere
        (a decoded artifact)."""
        files = files if files is not None else directory_files(Path(path))
        self.label = label or str(path)
        self.manifest = {}
        if CONFIG_FILE not in files and config is None:
            raise InputError(f"{self.label} is not a PEFT adapter: no {CONFIG_FILE}")
        if WEIGHTS_FILE not in files and tensors is None:
            raise InputError(f"{self.label}: PEFT adapter without {WEIGHTS_FILE}")
        try:
            cfg = (
                config
                if config is not None
                else json.loads(read_checked(files[CONFIG_FILE], self.label, CONFIG_FILE))
            )
        except RecursionError:
            raise InputError(f"{self.label}: {CONFIG_FILE} nests too deeply") from None
        except ValueError as e:
            raise InputError(f"{self.label}: {CONFIG_FILE} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise InputError(f"{self.label}: {CONFIG_FILE} is not a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise InputError(
                f"{self.label}: only LoRA adapters are supported, not {cfg['peft_type']}"
            )
        if cfg.get("use_dora"):
            raise InputError(f"{self.label}: DoRA adapters are not supported")
        self.config_data = cfg
        self.r = _config_number(cfg.get("r", 8), "r", int, "an integer", self.label)
        self.lora_alpha = _config_number(
            cfg.get("lora_alpha", 8), "lora_alpha", float, "a number", self.label
        )
        self.use_rslora = bool(cfg.get("use_rslora", False))
        for key in ("alpha_pattern", "rank_pattern"):
            if not isinstance(cfg.get(key) or {}, dict):
                raise InputError(f"{self.label}: {CONFIG_FILE} key '{key}' must be an object")
        self.target_modules = cfg.get("target_modules")
        self.files = carried_files(files)
        self._shards = tensors or SafetensorsShards(
            self.label, [files[WEIGHTS_FILE]], content="adapter"
        )
        self.modules, self.replaced = self._parse_modules(cfg)

    def _parse_modules(self, cfg) -> tuple[dict[str, LoraModule], dict[str, str]]:
        infos = self._shards.infos()
        modules: dict[str, LoraModule] = {}
        replaced: dict[str, str] = {}
        for key in infos:
            bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            if "lora_magnitude_vector" in bare:
                raise InputError(f"{self.label}: DoRA adapters are not supported")
            m = re.fullmatch(r"(.+)\.lora_(A|embedding_A)(\.weight)?", bare)
            if m is None:
                if not re.search(r"\.lora_(B|embedding_B)(\.weight|\.bias)?$", bare):
                    replaced[bare] = key
                continue
            module, kind = m.group(1), m.group(2)
            b_key = key.replace(f"lora_{kind}", f"lora_{kind.replace('A', 'B')}")
            if b_key not in infos:
                raise InputError(f"{self.label}: '{key}' has no matching B factor")
            a, b = infos[key], infos[b_key]
            r = a.shape[0]
            if len(b.shape) < 2 or b.shape[1] != r:
                raise InputError(
                    f"{self.label}: '{module}' has an A factor of rank {r} and a B factor of "
                    f"shape {list(b.shape)}; the factors do not fit together"
                )
            said = _pattern_value(cfg.get("rank_pattern"), module, self.r, self.label)
            if said != r:
                raise InputError(
                    f"{self.label}: {CONFIG_FILE} gives '{module}' rank {said}, but its "
                    f"factors have rank {r}"
                )
            alpha = _config_number(
                _pattern_value(cfg.get("alpha_pattern"), module, self.lora_alpha, self.label),
                "alpha_pattern",
                float,
                "a number",
                self.label,
            )
            scaling = alpha / (math.sqrt(r) if self.use_rslora else r)
            if kind == "embedding_A":
                layout, shape, transpose = "embedding", (a.shape[1], b.shape[0]), False
            elif len(a.shape) == 4:
                layout, shape, transpose = "conv", (b.shape[0], *a.shape[1:]), False
            else:
                transpose = bool(cfg.get("fan_in_fan_out", False))
                layout = "linear"
                shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            modules[f"{module}.weight"] = LoraModule(
                f"{module}.weight", key, b_key, layout, scaling, transpose, tuple(shape)
            )
            bias_key = f"{b_key.removesuffix('.weight')}.bias"
            if bias_key in infos:  # lora_bias: lora_B's bias adds Δb·scaling to the layer's bias
                modules[f"{module}.bias"] = LoraModule(
                    f"{module}.bias", key, bias_key, "bias", scaling, False, infos[bias_key].shape
                )
        return modules, replaced

    def infos(self) -> dict[str, TensorInfo]:
        return self._shards.infos()

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self._shards.get(name, rows)

    def delta(self, weight: str, rows: slice | None = None) -> torch.Tensor:
        """ΔW = B·A·scaling (float32) for the base weight ``weight``, optionally some rows."""
        m = self.modules[weight]
        if m.layout == "bias":
            return self.get(m.b, rows).float() * m.scaling
        a = self.get(m.a).float()
        b = self.get(m.b).float()
        if m.layout == "conv":
            b2 = b.flatten(1)
            if rows is not None:
                b2 = b2[rows]
            out = (b2 @ a.flatten(1)).reshape(b2.shape[0], *a.shape[1:])
        elif m.layout == "embedding" or m.transpose:
            # (B·A)ᵀ, rows taken from Aᵀ
            a_t = a.t() if rows is None else a[:, rows].t()
            out = a_t @ b.t()
        else:
            out = (b if rows is None else b[rows]) @ a
        return out * m.scaling

    def verify(self) -> None:
        self._shards.verify()

    def file_digest(self, path: Path) -> str | None:
        return self._shards.file_digest(path)

    def identified(self) -> None:
        self._shards.identified()

    def close(self) -> None:
        self._shards.close()


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()
