"""Plans: a YAML list of steps (``compress run PLAN.yaml``), expanded into a DAG.

A step has a ``name`` (the name of the artifact it stores), an optional
``matrix`` and one verb key::

    steps:
      - name: small-{expert}-{density}
        matrix: {expert: ./experts/*, density: [0.05, 0.1]}
        apply: {plugin: compeft, base: ./base, inputs: ["{expert}"], options: {density: "{density}"}}
      - name: merged
        merge: {plugin: ties, base: ./base, inputs: [small-*], options: {density: 0.5}}
      - name: score
        eval: {ref: merged, options: {data: test.jsonl}}

``apply``, ``merge``, ``extract``, ``train`` and ``sample`` take ``plugin``,
``base``, ``inputs`` and ``options``; ``eval`` takes ``ref``, ``base`` and
``options``; ``export`` takes ``ref``, ``out``, ``base`` and ``dtype``. A matrix
value is a list, a scalar, or a glob of paths (relative to the plan's
directory). ``{key}`` in any string is the matrix value (in a ``name``, a path
value gives its file name). An option value naming a file beside the plan
becomes its absolute path. An input naming a step (or a ``*`` pattern over
step names) depends on it; any other input is a path (relative to the plan) or
a store reference.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import itertools
import re
from pathlib import Path

from compressor.errors import InputError, UsageError

ARTIFACT_VERBS = {
    "apply": "compress",
    "merge": "merge",
    "extract": "extract",
    "train": "train",
    "sample": "sample",
}
VERBS = (*ARTIFACT_VERBS, "eval", "export")
_VERB_KEYS = {
    **{v: {"plugin", "base", "inputs", "options"} for v in ARTIFACT_VERBS},
    "merge": {"plugin", "base", "inputs", "options", "split"},
    "eval": {"ref", "base", "options"},
    "export": {"ref", "out", "base", "dtype"},
}
_STEP_KEYS = {"name", "matrix", *VERBS}
_TEMPLATE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass
class Step:
    """One expanded step: what to run and which steps it waits for.

    ``inputs``, ``base`` and ``ref`` hold paths, store references or, for an
    earlier step, ``("step", NAME)``.
    """

    name: str
    verb: str
    plugin: str | None = None
    inputs: list = dataclasses.field(default_factory=list)
    base: object = None
    ref: object = None
    out: str | None = None
    dtype: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    after: list[str] = dataclasses.field(default_factory=list)
    split: int = 1  # a merge run as this many parts, each a group of tensors on its worker

    @property
    def kind(self) -> str | None:
        """The method kind an artifact step runs (``compress`` for apply)."""
        return ARTIFACT_VERBS.get(self.verb)

    def describe(self) -> str:
        """One line: verb, plugin and what it reads."""

        def show(x):
            return f"<{x[1]}>" if isinstance(x, tuple) else str(x)

        what = [self.verb] + ([self.plugin] if self.plugin else [])
        reads = [show(x) for x in self.inputs] + ([show(self.ref)] if self.ref else [])
        text = " ".join(what) + (" " + ", ".join(reads) if reads else "")
        if self.base is not None:
            text += f" (base {show(self.base)})"
        if self.options:
            text += " " + " ".join(f"{k}={v}" for k, v in self.options.items())
        if self.split > 1:
            text += f" in {self.split} parts"
        return text


def load_plan(path: str | Path) -> list[Step]:
    """The plan's steps, matrices expanded, references resolved, in an order that runs
    every step after the ones it reads (plan order where free)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(
            f"{path} is not valid YAML" + (f" (line {mark.line + 1})" if mark else "")
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise UsageError(f"{path}: a plan is a mapping with a non-empty list of steps")
    extra = set(doc) - {"steps"}
    if extra:
        raise UsageError(f"{path}: key '{sorted(extra)[0]}' is not a plan key (steps)")
    here = path.resolve().parent
    raw = []
    for i, entry in enumerate(doc["steps"]):
        raw.extend(_expand(entry, f"{path}: steps[{i}]", here))
    names = [s.name for s in raw]
    seen = set()
    for name in names:
        if name in seen:
            raise UsageError(f"{path}: two steps are named '{name}'")
        seen.add(name)
    for step in raw:
        _link(step, names, here, f"{path}: step '{step.name}'")
    steps = _ordered(raw, path)
    for step in steps:
        check_step(step, f"{path}: step '{step.name}'")
    return steps


def check_step(step: Step, where: str) -> None:
    """What can be checked before any work: the method, its options, its base and input
    count; eval's options and data; export's dtype. A bad step is refused here, with the
    whole plan, not by a worker after the others started."""
    from compressor.errors import CompressorError

    try:
        if step.kind is not None:
            _check_method_step(step)
        elif step.verb == "eval":
            from compressor.app.eval_options import EVAL_OPTIONS
            from compressor.method import parse_options

            if parse_options(EVAL_OPTIONS, step.options, "eval")["data"] is None:
                raise UsageError("eval needs -o data PATH")
        elif step.dtype is not None:
            from compressor.io.safetensors import dtype_from_name

            dtype_from_name(step.dtype)
    except CompressorError as e:
        raise type(e)(f"{where}: {e}") from None


def _check_method_step(step: Step) -> None:
    from compressor.merging.loop import TensorMerge
    from compressor.method import check_count
    from compressor.registry import get_registry

    method = get_registry().method(step.plugin, step.kind)

    def label(x):
        return f"<{x[1]}>" if isinstance(x, tuple) else str(x)

    inputs = [label(x) for x in step.inputs]
    base = label(step.base) if step.base is not None else None
    if isinstance(method, TensorMerge):
        method.parse_options(step.options, method.input_labels(inputs, base))
    else:
        method.parse_options(step.options)
    if method.needs_base and base is None:
        raise UsageError(f"method '{step.plugin}' needs --base BASE")
    check_count(method, step.plugin, len(inputs))


def _expand(entry, where: str, here: Path) -> list[Step]:
    from compressor.store import check_name

    if not isinstance(entry, dict):
        raise UsageError(f"{where} must be a mapping")
    for key in entry:
        if key not in _STEP_KEYS:
            raise UsageError(f"{where}: key '{key}' is not a step key")
    verbs = [v for v in VERBS if v in entry]
    if len(verbs) != 1:
        raise UsageError(f"{where} needs exactly one of {', '.join(VERBS)}")
    verb = verbs[0]
    body = entry[verb]
    if not isinstance(body, dict):
        raise UsageError(f"{where}: {verb} must be a mapping")
    for key in body:
        if key not in _VERB_KEYS[verb]:
            keys = ", ".join(sorted(_VERB_KEYS[verb]))
            raise UsageError(f"{where}: {verb} takes no '{key}' (keys: {keys})")
    if not isinstance(entry.get("name"), str):
        raise UsageError(f"{where} needs a name")
    matrix = entry.get("matrix") or {}
    if not isinstance(matrix, dict):
        raise UsageError(f"{where}: matrix must be a mapping of key to values")
    axes = {key: _values(value, f"{where}: matrix.{key}", here) for key, value in matrix.items()}
    steps = []
    for combo in itertools.product(*axes.values()):
        env = dict(zip(axes, combo, strict=True))
        name = _fill(entry["name"], env, where, for_name=True)
        try:
            check_name(name)
        except Exception:
            raise UsageError(f"{where}: '{name}' is not a valid artifact name") from None
        b = {k: _fill_any(v, env, where) for k, v in body.items()}
        if verb in ARTIFACT_VERBS:
            if not isinstance(b.get("plugin"), str):
                raise UsageError(f"{where}: {verb} needs a plugin")
            inputs = b.get("inputs") or []
            if isinstance(inputs, str):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs:
                raise UsageError(f"{where}: {verb} needs a list of inputs")
        else:
            inputs = []
            if not isinstance(b.get("ref"), str):
                raise UsageError(f"{where}: {verb} needs a ref")
            if verb == "export" and not isinstance(b.get("out"), str):
                raise UsageError(f"{where}: export needs an out directory")
        options = b.get("options") or {}
        if not isinstance(options, dict):
            raise UsageError(f"{where}: options must be a mapping")
        out = b.get("out")
        split = b.get("split", 1)
        if isinstance(split, bool) or not isinstance(split, int) or split < 1:
            raise UsageError(f"{where}: split must be a whole number of parts (1 or more)")
        steps.append(
            Step(
                name=name,
                verb=verb,
                plugin=b.get("plugin"),
                inputs=[str(x) for x in inputs],
                base=b.get("base"),
                ref=b.get("ref"),
                out=str(here / out) if out is not None else None,
                dtype=b.get("dtype"),
                options={k: _option_path(_option_text(v), here) for k, v in options.items()},
                split=split,
            )
        )
    return steps


def _values(value, where: str, here: Path) -> list:
    if isinstance(value, list):
        if not value:
            raise UsageError(f"{where} is an empty list")
        return value
    if isinstance(value, str) and any(c in value for c in "*?["):
        pattern = value if Path(value).is_absolute() else str(here / value)
        found = sorted(glob.glob(pattern))
        if not found:
            raise UsageError(f"{where}: '{value}' matches no file")
        return found
    return [value]


def _fill(text: str, env: dict, where: str, for_name: bool = False) -> str:
    def sub(m):
        key = m.group(1)
        if key not in env:
            raise UsageError(f"{where}: '{{{key}}}' is not a matrix key")
        value = env[key]
        if for_name and isinstance(value, str) and ("/" in value or value.endswith(".safetensors")):
            return Path(value).name.removesuffix(".safetensors")
        return _option_text(value)

    return _TEMPLATE.sub(sub, text)


def _fill_any(value, env: dict, where: str):
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value)
        if whole and whole.group(1) in env:
            return env[whole.group(1)]
        return _fill(value, env, where)
    if isinstance(value, list):
        return [_fill_any(v, env, where) for v in value]
    if isinstance(value, dict):
        return {k: _fill_any(v, env, where) for k, v in value.items()}
    return value


def _option_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_option_text(v) for v in value)
    return str(value)


def _option_path(text: str, here: Path) -> str:
    """An option naming a file beside the plan, as an absolute path."""
    if text and not Path(text).is_absolute() and (here / text).exists():
        return str(here / text)
    return text


def _link(step: Step, names: list[str], here: Path, where: str) -> None:
    """Turn references to steps into ("step", NAME) and paths into absolute paths."""
    others = [n for n in names if n != step.name]

    def one(ref: str, allow_many: bool):
        if ref in others:
            return [("step", ref)]
        if any(c in ref for c in "*?[") and not ref.startswith((".", "/", "~")):
            matched = [n for n in others if fnmatch.fnmatchcase(n, ref)]
            if matched and allow_many:
                return [("step", n) for n in matched]
            if matched:
                raise UsageError(f"{where}: '{ref}' must name one step, not {len(matched)}")
        local = here / ref
        if not Path(ref).is_absolute() and (ref.startswith(".") or local.exists()):
            return [str(local)]
        if any(c in ref for c in "*?["):
            found = sorted(glob.glob(ref if Path(ref).is_absolute() else str(local)))
            if not found:
                raise UsageError(f"{where}: '{ref}' matches no step and no file")
            if not allow_many and len(found) > 1:
                raise UsageError(f"{where}: '{ref}' must name one input, not {len(found)}")
            return found
        return [ref]

    step.inputs = [x for ref in step.inputs for x in one(ref, True)]
    if isinstance(step.base, str):
        step.base = one(step.base, False)[0]
    elif step.base is not None:
        raise UsageError(f"{where}: base must be a path, store reference or step")
    if isinstance(step.ref, str):
        step.ref = one(step.ref, False)[0]
    step.after = list(
        dict.fromkeys(x[1] for x in [*step.inputs, step.base, step.ref] if isinstance(x, tuple))
    )


def _ordered(steps: list[Step], path) -> list[Step]:
    done, out = set(), []
    remaining = list(steps)
    while remaining:
        ready = [s for s in remaining if all(d in done for d in s.after)]
        if not ready:
            cycle = ", ".join(s.name for s in remaining[:5])
            raise UsageError(f"{path}: the steps depend on each other in a cycle ({cycle})")
        for s in ready:
            done.add(s.name)
            out.append(s)
        remaining = [s for s in remaining if s.name not in done]
    return out
