"""Merge parameters as mergekit has them: per expert, over the layers, by tensor name.

A merge option may be given as

- one value for every expert and tensor: ``-o density 0.5``;
- per expert, as a comma list in the order the experts are given (options that
  are per expert only): ``-o weights 0.3,0.7``; or for one expert, by its
  1-based position or its REF as written: ``-o density@2 0.3``, ``-o density@ft1 0.3``
  (``@*`` is every expert);
- as a gradient over the layers, a comma list interpolated from the first layer
  to the last (mergekit's gradients): ``-o t 0,0.5,1`` (for per-expert options,
  with an ``@``: ``-o density@* 0.2,0.8``);
- for tensors whose name contains a filter: ``-o t:self_attn 0,0.5,1``
  (with an expert too: ``-o density@1:mlp 0.3``).

Each option's value is then a list of :class:`Rule` s, tried in order: the first
that applies to the expert and whose filter is in the tensor's name gives the
value. From the command line, rules for one expert come before rules for every
expert, and filtered rules before unfiltered ones; a mergekit config keeps its
own order (a model's parameters, then the slice's, then the global ones).
A layer's position t is i / (layers − 1); tensors outside the layers (embeddings,
final norm, head) take t = 0, as in mergekit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from compressor.errors import OptionError
from compressor.method import PARSERS, Option, known_option, option_text

LAYER = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks)\.)(\d+)(\.)")
POST_SLOT = 1 << 30  # the slot of tensors after the layers (final norm, head)


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor name belongs to (``model.layers.3.mlp...`` → 3)."""
    m = LAYER.search(name)
    return int(m.group(2)) if m else None


def renamed(name: str, layer: int) -> str:
    """The tensor name with its layer number replaced."""
    return LAYER.sub(lambda m: f"{m.group(1)}{layer}{m.group(3)}", name, count=1)


def is_pre_layers(name: str) -> bool:
    """A tensor outside the layers that comes before them (embeddings)."""
    return "embed" in name or name.endswith(("wte.weight", "wpe.weight"))


def tensor_slot(name: str) -> int:
    """The layer index; −1 before the layers (embeddings), POST_SLOT after (norm, head)."""
    i = layer_index(name)
    if i is not None:
        return i
    return -1 if is_pre_layers(name) else POST_SLOT


def in_module(tensor: str, prefix: str) -> bool:
    """Whether a tensor lies under a module's weight prefix (``language_model.``), at the
    start of its name or after a wrapper's (``model.language_model.`` in transformers 5)."""
    return tensor.startswith(prefix) or f".{prefix}" in tensor


def layer_positions(names: Sequence[str], modules: Sequence[str] = ()) -> dict[str, float]:
    """t in [0, 1] per tensor name: its layer's position among the layers of its module
    (the weight prefixes in ``modules``; the rest of the model counts as one)."""
    groups: dict[str | None, list[str]] = {}
    for name in names:
        owner = next((m for m in modules if in_module(name, m)), None)
        groups.setdefault(owner, []).append(name)
    out = {}
    for group in groups.values():
        layers = [i for i in map(layer_index, group) if i is not None]
        count = max(layers) + 1 if layers else 0
        for name in group:
            i = layer_index(name)
            out[name] = 0.0 if i is None else (i / (count - 1) if count > 1 else 1.0)
    return out


@dataclass(frozen=True)
class Rule:
    """One setting: a value (or a gradient of values) for an expert and a tensor filter."""

    value: object  # a scalar or a list (a gradient over the layers)
    expert: int | None = None  # 0-based input position; None: every expert / shared
    filter: str | None = None  # a substring of tensor names; None: every tensor
    layers: tuple[int, int] | None = None  # output layer slots [lo, hi) (a config's slice)
    module: str | None = None  # a module's weight prefix (a config's modules); None: any

    def to_json(self) -> dict:
        out = {"value": self.value}
        if self.expert is not None:
            out["expert"] = self.expert + 1
        if self.filter is not None:
            out["filter"] = self.filter
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.module is not None:
            out["module"] = self.module
        return out

    @classmethod
    def from_json(cls, obj: dict) -> Rule:
        expert, layers = obj.get("expert"), obj.get("layers")
        return cls(
            obj["value"],
            None if expert is None else expert - 1,
            obj.get("filter"),
            None if layers is None else tuple(layers),
            obj.get("module"),
        )

    def applies(self, tensor: str, expert: int | None) -> bool:
        if self.expert is not None and self.expert != expert:
            return False
        if self.module is not None and not in_module(tensor, self.module):
            return False
        if self.layers is not None and not self.layers[0] <= tensor_slot(tensor) < self.layers[1]:
            return False
        return self.filter is None or self.filter == "*" or self.filter in tensor


def evaluate(value, t: float):
    """A scalar as it is; a gradient interpolated at t (numbers) or indexed (the rest)."""
    if not isinstance(value, list):
        return value
    if not value:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def resolve(rules: list[Rule], tensor: str, t: float, expert: int | None = None):
    """The value the first applicable rule gives, or None."""
    for rule in rules:
        if rule.applies(tensor, expert):
            value = evaluate(rule.value, t)
            if value is not None:
                return value
    return None


def split_key(key: str) -> tuple[str, str | None, str | None]:
    """``NAME[@EXPERT][:FILTER]`` → (NAME, EXPERT, FILTER)."""
    name, _, filt = key.partition(":")
    name, at, expert = name.partition("@")
    return name, (expert if at else None), (filt or None)


def expert_position(selector: str, labels: Sequence[str], option: str) -> int | None:
    """The 0-based position an ``@EXPERT`` selector names (None for ``*``)."""
    if selector == "*":
        return None
    if selector.isdigit():
        i = int(selector)
        if 1 <= i <= len(labels):
            return i - 1
        raise OptionError(
            f"option '{option}@{selector}' names expert {i}; there "
            f"{'is' if len(labels) == 1 else 'are'} {len(labels)}"
        )
    matches = [i for i, label in enumerate(labels) if label == selector]
    if len(matches) != 1:
        raise OptionError(
            f"option '{option}@{selector}': '{selector}' is not one of the experts "
            f"({', '.join(labels)})"
        )
    return matches[0]


def parse_scalar(option: Option, text: str):
    """One value of a merge option, checked (a bool, int, float or choice)."""
    scalar = Option(option.name, option.type.rstrip("s"), None, "", option.choices, option.check)
    if scalar.type not in PARSERS:
        scalar = Option(option.name, "float", None, "", (), option.check)
    return scalar.parse(text.strip())


def parse_merge_options(
    options: Sequence[Option],
    per_expert: frozenset[str],
    pairs,
    labels: Sequence[str],
    owner: str,
) -> dict:
    """Check ``-o`` pairs of a merge method; every option's value is a plain value or rules.

    An option given once, plainly, keeps its plain value (so stored parameters stay
    readable); anything per expert, filtered or a gradient becomes a list of rule dicts.
    """
    by_name = {o.name: o for o in options}
    values = {o.name: o.default for o in options}
    given: dict[str, list[tuple[int, Rule]]] = {}
    items = list(pairs.items() if isinstance(pairs, dict) else pairs)
    for order, (key, raw) in enumerate(items):
        name, selector, filt = split_key(key)
        option = known_option(by_name, name, owner)
        raw = option_text(raw)
        if selector is not None and name not in per_expert:
            raise OptionError(f"option '{name}' is not per expert; '{key}' names an expert")
        expert = expert_position(selector, labels, name) if selector is not None else None
        parts = [p for p in raw.split(",") if p.strip()] if option.type != "str" else [raw]
        if not parts:
            raise OptionError(f"option '{name}' expects a value; got '{raw}'")
        try:
            parsed = [parse_scalar(option, p) for p in parts]
        except OptionError as e:
            listed = len(parts) > 1 or option.type in ("floats", "ints")
            if not listed or " expects " not in str(e):
                raise
            many = PARSERS.get(option.type.rstrip("s") + "s", PARSERS["floats"])[1]
            raise OptionError(f"option '{name}' expects {many}; got '{raw}'") from None
        rules = given.setdefault(name, [])
        if name in per_expert and selector is None and len(parsed) > 1:
            if len(parsed) != len(labels):
                n = len(labels)
                raise OptionError(
                    f"option '{name}' has {len(parsed)} values for {n} expert{'s' if n != 1 else ''}"
                )
            rules += [(order, Rule(v, i, filt)) for i, v in enumerate(parsed)]
        else:
            rules.append((order, Rule(parsed[0] if len(parsed) == 1 else parsed, expert, filt)))
    for name, rules in given.items():
        plain = [r for _, r in rules]
        if len(plain) == 1 and plain[0].expert is None and plain[0].filter is None:
            values[name] = plain[0].value  # one value, or a shared option's gradient
            continue
        if name in per_expert and all(r.filter is None for r in plain):
            if [r.expert for r in plain] == list(range(len(labels))):
                values[name] = [r.value for r in plain]  # one per expert, in input order
                continue
        ordered = sorted(rules, key=lambda x: (x[1].expert is None, x[1].filter is None, x[0]))
        values[name] = [r.to_json() for _, r in ordered]
    return values


def rules_of(value, per_expert: bool) -> list[Rule]:
    """An option's value as rules: a plain value is one rule for everything, a plain list
    one value per expert (per-expert options) or a gradient (the others)."""
    if isinstance(value, list) and value and isinstance(value[0], dict) and "value" in value[0]:
        return [Rule.from_json(r) for r in value]
    if per_expert and isinstance(value, list):
        return [Rule(v, i) for i, v in enumerate(value)]
    return [Rule(value)]


class TensorParameters:
    """Every merge option's value for one tensor (shared) and per expert."""

    def __init__(self, options: dict, per_expert: frozenset[str], experts: int):
        self._rules = {k: rules_of(v, k in per_expert) for k, v in options.items()}
        self._per_expert = per_expert
        self.experts = experts

    def at(self, tensor: str, t: float) -> tuple[dict, dict[str, list]]:
        """(shared values, per-expert value lists) for one tensor at layer position t."""
        shared, per = {}, {}
        for name, rules in self._rules.items():
            if name in self._per_expert:
                per[name] = [resolve(rules, tensor, t, i) for i in range(self.experts)]
            else:
                shared[name] = resolve(rules, tensor, t)
        return shared, per
