"""The method interface every plugin implements.

A :class:`Method` says what it is (name, kind, summary, reference, version)
and which options it takes; the one :class:`Option` list is the source of
truth for ``-o KEY VALUE`` checking, ``compress plugins show`` and the docs.
``run`` reads its inputs, writes through the job's writer and returns a
:class:`Manifest`; it never touches the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import OptionError, UsageError

KINDS = ("compress", "merge", "extract", "sample", "train")
VERBS = {
    "compress": "apply",
    "merge": "merge",
    "extract": "extract",
    "sample": "sample",
    "train": "train",
}


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # nan and inf parse as floats, but no option means them
        raise ValueError(text)
    return value


def _float_list(text: str) -> list[float]:
    return [_float(x) for x in text.split(",") if x.strip()]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _int(text: str) -> int:
    return int(text)


def _scale(text: str) -> float | str:
    return "auto" if text.strip().lower() == "auto" else _float(text)


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "float": (_float, "a finite number"),
    "int": (_int, "an integer"),
    "bool": (_bool, "true or false"),
    "str": (str, "a string"),
    "floats": (_float_list, "comma-separated finite numbers"),
    "ints": (_int_list, "comma-separated integers"),
    "choice": (str, "one of the choices"),
    "float|auto": (_scale, "a finite number or auto"),
}


def positive(v) -> str | None:
    """An Option check: the value must be above 0."""
    return None if v > 0 else "must be positive"


def non_negative(v) -> str | None:
    """An Option check: the value must be 0 or more."""
    return None if v >= 0 else "must be 0 or more"


def fraction(v) -> str | None:
    """An Option check: the value must be in (0, 1]."""
    return None if 0 < v <= 1 else "must be in (0, 1]"


@dataclass(frozen=True)
class Option:
    """One typed ``-o KEY VALUE`` option with its default and help."""

    name: str
    type: str  # a key of PARSERS
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None

    def parse(self, text: str) -> Any:
        """Turn the command-line text into a checked value, or raise OptionError."""
        if self.choices:
            if text not in self.choices:
                raise OptionError(
                    f"option '{self.name}' must be one of {', '.join(self.choices)}; got '{text}'"
                )
            return text
        parser, expected = PARSERS[self.type]
        try:
            value = parser(text)
        except (ValueError, OverflowError):
            raise OptionError(f"option '{self.name}' expects {expected}; got '{text}'") from None
        complaint = self.check(value) if self.check else None
        if complaint:
            raise OptionError(f"option '{self.name}' {complaint}; got '{text}'")
        return value

    def describe(self) -> dict:
        """A JSON-able description for ``plugins --json`` and the docs."""
        return {
            "name": self.name,
            "type": "choice" if self.choices else self.type,
            "default": self.default,
            "help": self.help,
            **({"choices": list(self.choices)} if self.choices else {}),
        }


def parse_options(
    options: Sequence[Option], pairs: Sequence[tuple[str, str]] | dict, owner: str
) -> dict:
    """Check KEY VALUE pairs against an option schema; return every option's value."""
    by_name = {o.name: o for o in options}
    values = {o.name: o.default for o in options}
    items = pairs.items() if isinstance(pairs, dict) else pairs
    for key, raw in items:
        values[key] = known_option(by_name, key, owner).parse(option_text(raw))
    return values


def known_option(by_name: dict[str, Option], key: str, owner: str) -> Option:
    """The option named ``key``, or an OptionError listing the known ones."""
    option = by_name.get(key)
    if option is None:
        known = ", ".join(sorted(by_name)) or "none"
        raise OptionError(f"unknown option '{key}' for {owner} (options: {known})")
    return option


def option_text(raw) -> str:
    """An option's value as command-line text (a list from the API joined by commas)."""
    return ",".join(str(x) for x in raw) if isinstance(raw, (list, tuple)) else str(raw)


@dataclass
class Manifest:
    """What a run produced: how to read it back, its parameters' effect and metrics."""

    content: str  # model | delta | adapter | tensors
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # method-specific, kept in the store


@dataclass
class Job:
    """Everything a run gets: inputs, checked options, a writer, and reporting hooks."""

    base: Any  # TensorSource or None
    inputs: list  # TensorSource
    options: dict
    writer: Any  # ArtifactWriter
    progress: Callable  # progress(iterable, desc=..., total=...) -> iterable
    warn: Callable[[str], None]
    positions: dict | None = None  # merges: each tensor's layer position t (else from names)
    part: tuple[int, int] | None = None  # merges run in parts: (k, n), this run writes part k
    # merges from a mergekit config in mergekit-exact mode: compute in this dtype (a name,
    # or "stored": each tensor's own), as mergekit does; None: float32
    compute_dtype: str | None = None
    # merges with -o scale auto: scores a candidate model (a TensorSource) on the
    # validation data, returning (metric name, value, higher is better)
    score: Callable | None = None
    # the torch device the method's tensor math runs on (compressor.io.devices); reading
    # and writing stay on the CPU
    device: str = "cpu"


class Method:
    """Base class for a method. Subclasses set the class attributes and ``run``."""

    name: str = ""
    kind: str = ""
    summary: str = ""
    reference: str = ""
    version: str = "1"
    options: Sequence[Option] = ()
    needs_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = 1

    reads_raw: tuple[str, ...] = ()  # encodings this method takes as stored, not decoded
    uses_device: bool = False  # whether run() puts its tensor math on job.device
    needs_float64: bool = False  # computes in float64 there (MPS has none: refused on it)
    example_options: dict[str, str] = {}  # what `plugins show` puts in its example command

    def run(self, job: Job) -> Manifest:
        """Read ``job.inputs``, write the result through ``job.writer``, return a Manifest."""
        raise NotImplementedError

    def decode(self, raw):
        """The tensors an artifact this method encoded stands for, as a TensorSource.

        ``raw`` is the artifact's stored tensors (with its manifest); methods whose
        artifacts are encoded (their manifest names ``encoding``) override this,
        usually with a :class:`compressor.io.sources.DecodedSource`.
        """
        raise NotImplementedError(f"method '{self.name}' writes no encoded artifacts")

    def merge_space(self, base, experts: list):
        """Where merges of this method's artifacts run, when not on the decoded weights.

        For an encoding whose decoded weights are linear in a few stored tensors once the
        rest is fixed (a sketch's tables, its codes shared by every tune): given the decoded
        ``base`` and ``experts``, return ``(base, experts, extra)`` as sources of just those
        tensors plus the manifest extra that makes the merged artifact decode (with the
        base as its parent ``base``); None when the inputs do not share the rest.
        """
        return None

    @property
    def decodes(self) -> bool:
        """Whether this method decodes the artifacts it encodes."""
        return type(self).decode is not Method.decode

    def parse_options(self, pairs: Sequence[tuple[str, str]] | dict) -> dict:
        """Check ``-o`` pairs against the schema; fill in defaults."""
        return parse_options(self.options, pairs, f"method '{self.name}'")

    def example(self) -> str:
        """A command line that runs this method, made from its declaration."""
        verb = VERBS[self.kind]
        parts = ["compress", verb, "--plugin", self.name]
        if self.needs_base or self.kind == "merge":
            parts += ["--base", "BASE"]
        inputs = {
            "merge": ["EXPERT1", "EXPERT2"],
            "extract": ["MODEL"],
            "sample": ["ARTIFACT"],
            "train": ["MODEL"],
        }.get(self.kind, ["INPUT"] * max(1, self.min_inputs))
        parts += inputs
        for key, value in self.example_options.items():
            parts += ["-o", key, value]
        for o in () if self.example_options else self.options:
            if o.default is not None:
                parts += [
                    "-o",
                    o.name,
                    str(o.default).lower() if isinstance(o.default, bool) else str(o.default),
                ]
                break
        return " ".join(parts)

    def describe(self) -> dict:
        """A JSON-able description for ``compress plugins``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "summary": self.summary,
            "reference": self.reference,
            "version": self.version,
            "needs_base": self.needs_base,
            "options": [o.describe() for o in self.options],
            "example": self.example(),
        }


def check_count(method, plugin: str, n: int) -> None:
    """Refuse fewer or more inputs than the method takes."""
    noun = "expert" if method.kind == "merge" else "input"
    if n < method.min_inputs:
        raise UsageError(
            f"method '{plugin}' needs at least {_counted(method.min_inputs, noun)}; got {n or 'none'}"
        )
    if method.max_inputs is not None and n > method.max_inputs:
        raise UsageError(
            f"method '{plugin}' takes at most {_counted(method.max_inputs, noun)}; got {n}"
        )


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
