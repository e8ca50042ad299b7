"""``compress merge --config``: a mergekit YAML config, run as it is.

Supported keys: ``merge_method``, ``base_model``, ``models`` (``model`` and
``parameters`` each), ``slices`` (``sources`` with ``model``, ``layer_range`` and
``parameters``; a slice's own ``base_model`` and ``parameters``), global
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` (or a ``tokenizer``
``source`` and ``pad_to_multiple_of``: :mod:`compressor.merging.vocabulary`) and, in a
multi-document file (mergekit-multi), ``name``: each document is a stage stored
under its name, which later stages use as a model. ``mergekit_exact`` (ours, default
true) computes as mergekit does, in the config's dtype with its tie order
(:mod:`compressor.merging.exact`); false computes in float32 and casts once. Any other key is refused,
naming it; a parameter the method does not take is ignored with a warning, as
mergekit ignores it. Parameters take mergekit's forms (a value, a gradient list, ``filter``
and ``value`` conditions) and mergekit's defaults; they become the same per-tensor
rules ``-o`` builds (:mod:`compressor.merging.params`).
"""

from __future__ import annotations

from pathlib import Path

from compressor.app.chat_templates import check_chat_template, resolve_template, with_chat_template
from compressor.errors import InputError, UsageError
from compressor.merging.params import (
    POST_SLOT,
    Rule,
    parse_scalar,
)
from compressor.merging.slices import stacked
from compressor.reporting import warn

METHODS = {
    "task_arithmetic": "task-arithmetic",
    "ties": "ties",
    "dare_ties": "dare-ties",
    "dare_linear": "dare-linear",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs-ties",
    "della": "della",
    "della_linear": "della-linear",
    "sce": "sce",
    "linear": "linear",
    "slerp": "slerp",
    "nuslerp": "nuslerp",
    "multislerp": "multislerp",
    "karcher": "karcher",
    "model_stock": "model-stock",
    "nearswap": "nearswap",
    "arcee_fusion": "arcee-fusion",
    "passthrough": "passthrough",
    # ours, not mergekit's (2025's data-free merges), under the same names as the plugins
    "tsv_m": "tsv-m",
    "iso_c": "iso-c",
    "iso_cts": "iso-cts",
    "wudi": "wudi",
}

_BOOL_TO_NORMALIZE = {True: "weights", False: "none"}
_TIES_FAMILY = {"ties", "dare-ties", "dare-linear", "breadcrumbs", "breadcrumbs-ties"}
_TIES_FAMILY |= {"della", "della-linear"}

# mergekit parameter → our option, per method family (a converter where the value differs)
_COMMON = {"weight": "weights", "lambda": "scale"}
_SUBSPACE = {**_COMMON, "calibrate": "calibrate", "svc_alpha": "svc_alpha"}  # ours
PARAMETERS = {
    "task-arithmetic": {**_COMMON, "normalize": "normalize"},
    **{
        m: {**_COMMON, "density": "density", "normalize": ("normalize", _BOOL_TO_NORMALIZE)}
        for m in _TIES_FAMILY
    },
    "sce": {"select_topk": "select_topk"},
    "linear": {"weight": "weights", "normalize": "normalize"},
    "slerp": {"t": "t"},
    "nuslerp": {"weight": "weights", "nuslerp_row_wise": "row_wise", "nuslerp_flatten": "flatten"},
    "multislerp": {"weight": "weights", "normalize_weights": "normalize_weights"},
    "karcher": {"max_iter": "max_iter", "tol": "tol"},
    "model-stock": {"filter_wise": "filter_wise"},
    "nearswap": {"t": "t"},
    "arcee-fusion": {},
    "passthrough": {"scale": "scale"},
    "tsv-m": {**_SUBSPACE},
    "iso-c": {**_SUBSPACE},
    "iso-cts": {**_SUBSPACE, "common_space_fraction": "common"},
    "wudi": {**_SUBSPACE, "iter_num": "steps", "lr": "lr"},
}
for _m in ("dare-ties", "dare-linear", "della", "della-linear"):
    PARAMETERS[_m]["rescale"] = ("rescale", {True: "l1", False: "none"})
for _m in ("breadcrumbs", "breadcrumbs-ties"):
    PARAMETERS[_m]["gamma"] = "gamma"
for _m in ("della", "della-linear"):
    PARAMETERS[_m]["epsilon"] = "epsilon"
# flags that change only how mergekit stores a mask, never the result
NO_EFFECT = {"int8_mask"}

# mergekit's defaults where ours differ (a config means mergekit's)
MERGEKIT_DEFAULTS = {
    "ties": {"density": 1.0},
    "dare-ties": {"density": 1.0, "rescale": "l1"},
    "dare-linear": {"density": 1.0, "rescale": "l1"},
    "breadcrumbs": {"density": 1.0},
    "breadcrumbs-ties": {"density": 1.0},
    "della": {"density": 1.0},
    "della-linear": {"density": 1.0},
}

TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "modules",
    "mergekit_exact",
    "name",
}
_MODULE_KEYS = {"models", "slices", "parameters"}
# a multimodal model's modules as mergekit's architectures name them: their weight prefixes
MODULE_PREFIXES = {
    "text_decoder": "language_model.",
    "multi_modal_projector": "multi_modal_projector.",
    "vision_tower": "vision_tower.",
    "vision_model": "vision_model.",
    "encoder": "encoder.",
    "decoder": "decoder.",
}
_TOKENIZER_KEYS = {"source", "pad_to_multiple_of"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}
_SLICE_KEYS = {"sources", "base_model", "parameters"}


def load_stages(path: str | Path) -> list[dict]:
    """The documents of a mergekit config file, checked to be mappings."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise InputError(f"{path} is not valid YAML{at}") from None
    if not docs:
        raise InputError(f"{path} holds no merge configuration")
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise InputError(f"{_where(path, i, len(docs))} is not a mapping of config keys")
    return docs


def _where(path, i: int, n: int) -> str:
    return f"{path}" if n == 1 else f"{path} (document {i + 1})"


def _refuse_keys(obj: dict, allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise UsageError(f"{where}: key '{key}' is not supported by compress merge --config")


def _model_ref(value, where: str) -> str:
    """A config's model reference as one string: a path, store reference or hub id, with
    ``@REVISION`` for a hub id and ``+LORA`` for an adapter added to the model (mergekit's
    string form); mergekit's mapping form ({model: {path, revision}, lora: {path}}) too."""
    if isinstance(value, dict):
        value = _mapping_ref(value, where)
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: model must be a path, store reference or hub id")
    if "+" in value and not Path(value).exists():
        parts = value.split("+")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise UsageError(f"{where}: '{value}' must be MODEL+LORA (one adapter)")
    return value


def _mapping_ref(value: dict, where: str) -> str:
    def path_of(entry, key):
        if isinstance(entry, str):
            return entry
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UsageError(f"{where}: model.{key} must be a path or a mapping with a path")
        _refuse_keys(entry, {"path", "revision"}, f"{where}: model.{key}")
        revision = entry.get("revision")
        return entry["path"] + (f"@{revision}" if revision else "")

    _refuse_keys(value, {"model", "lora"}, f"{where}: model")
    if "model" not in value:
        raise UsageError(f"{where}: model needs a model")
    ref = path_of(value["model"], "model")
    return ref + (f"+{path_of(value['lora'], 'lora')}" if value.get("lora") else "")


def _expand_loras(base, inputs: list, build, where: str):
    """mergekit's MODEL+LORA references: the run gets the model in the reference's place
    and the adapter as an extra input at the end (both are parents in the lineage);
    ``build`` sees one source, the adapter added to the model. Returns (base, inputs,
    build) for the run."""

    def split(ref):
        return ref.split("+") if ref and "+" in ref and not Path(ref).exists() else None

    pieces = [split(ref) for ref in [base, *inputs]]
    if not any(pieces):
        return base, inputs, build
    loras = [(i - 1, p[1]) for i, p in enumerate(pieces) if p]  # -1: the base
    run_base = pieces[0][0] if pieces[0] else base
    run_inputs = [p[0] if p else ref for p, ref in zip(pieces[1:], inputs, strict=True)]
    run_inputs += [lora for _, lora in loras]

    def expanded(base_source, input_sources):
        from compressor.io.deltas import ModelFromDelta

        n = len(inputs)
        adapters = dict(zip((i for i, _ in loras), input_sources[n:], strict=True))
        sources = [base_source, *input_sources[:n]]
        for i, adapter in adapters.items():
            sources[i + 1] = ModelFromDelta(sources[i + 1], adapter, warn)
        if build is None:
            return sources[0], sources[1:], None
        return build(sources[0], sources[1:])

    return run_base, run_inputs, expanded


def _settings(setting, where: str) -> list[tuple[object, str | None]]:
    """A mergekit parameter setting as (value, filter) pairs, in mergekit's order."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(s, dict) for s in setting):
        out = []
        for cond in setting:
            _refuse_keys(cond, {"value", "filter"}, where)
            if "value" not in cond:
                raise UsageError(f"{where}: a condition needs a value")
            out.append((cond["value"], cond.get("filter")))
        return out
    return [(setting, None)]


class _Translator:
    """Turns one stage's parameters into our method's option values (rules)."""

    def __init__(self, method, where: str):
        self.method = method
        self.where = where
        self.table = PARAMETERS[method.name]
        self.options = {o.name: o for o in method.options}
        self.rules: dict[str, list[Rule]] = {}

    def add(
        self,
        params,
        expert: int | None,
        layers: tuple[int, int] | None,
        where: str,
        module: str | None = None,
    ):
        if params is None:
            return
        if not isinstance(params, dict):
            raise UsageError(f"{where}: parameters must be a mapping")
        for key, setting in params.items():
            if key in NO_EFFECT:
                continue
            target = self.table.get(key)
            if target is None:  # mergekit reads the parameters a method takes, no others
                warn(f"{where}: parameter '{key}' is ignored by {self.method.name}, as in mergekit")
                continue
            name, convert = target if isinstance(target, tuple) else (target, None)
            if expert is not None and name not in self.method.per_expert:
                raise UsageError(
                    f"{where}: parameter '{key}' applies to the whole merge, not to one model"
                )
            for value, filt in _settings(setting, f"{where}: parameter '{key}'"):
                value = self._checked(name, value, convert, key, where)
                self.rules.setdefault(name, []).append(Rule(value, expert, filt, layers, module))

    def _checked(self, name, value, convert, key, where):
        option = self.options[name]

        def one(v):
            if convert is not None:
                if v not in convert:
                    raise UsageError(f"{where}: parameter '{key}' must be true or false; got {v!r}")
                v = convert[v]
            if isinstance(v, bool):
                v = "true" if v else "false"
            try:
                return parse_scalar(option, str(v))
            except UsageError as e:
                raise UsageError(f"{where}: {e}".replace("option", "parameter", 1)) from None

        if isinstance(value, list):
            if not value:
                raise UsageError(f"{where}: parameter '{key}' has an empty gradient")
            return [one(v) for v in value]
        return one(value)

    def values(self) -> dict:
        values = {o.name: o.default for o in self.method.options}
        values.update(MERGEKIT_DEFAULTS.get(self.method.name, {}))
        for name, rules in self.rules.items():
            values[name] = [r.to_json() for r in rules]
        return values


def run_config(
    path: str | Path,
    *,
    name: str | None = None,
    store=None,
    quiet: bool = True,
    max_shard_size=None,
) -> list:
    """Run every stage of a mergekit config in order; return the stored artifacts."""
    from compressor.app.runs import ConfigStage, run_method
    from compressor.registry import get_registry
    from compressor.store import check_name

    stages = load_stages(path)
    plans = [_plan(stage, path, i, len(stages), get_registry()) for i, stage in enumerate(stages)]
    named = [p["name"] for p in plans if p["name"]]
    twice = next((n for n in named if named.count(n) > 1), None)
    if twice is not None:
        raise UsageError(f"{path}: two documents are named '{twice}'; each stage needs its own")
    for i, plan in enumerate(plans[:-1]):
        if not plan["name"]:
            raise UsageError(
                f"{_where(path, i, len(plans))} needs a name: later stages refer to it by name"
            )
    kw = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    records = []
    for i, plan in enumerate(plans):
        last = i == len(plans) - 1
        stage_name = name if last and name is not None else plan["name"] or "merge"
        records.append(
            run_method(
                "merge",
                plan["plugin"],
                plan["inputs"],
                base=plan["base"],
                name=check_name(stage_name),
                store=store,
                quiet=quiet,
                dtype=plan["dtype"],
                config=ConfigStage(
                    plan["values"],
                    plan["build"],
                    {"mergekit_config": plan["config"], **plan["extra"]},
                    plan["compute_dtype"],
                ),
                **kw,
            )
        )
    return records


def _plan(stage: dict, path, i: int, n: int, registry) -> dict:
    where = _where(path, i, n)
    _refuse_keys(stage, TOP_KEYS, where)
    if "merge_method" not in stage:
        raise UsageError(f"{where}: merge_method is missing")
    mk_name = stage["merge_method"]
    plugin = METHODS.get(mk_name)
    if plugin is None:
        known = ", ".join(sorted(METHODS))
        raise UsageError(f"{where}: merge_method '{mk_name}' is not supported (supported: {known})")
    method = registry.method(plugin, "merge")
    modules = []  # (weight prefix, its models' parameters, its parameters, where)
    if "modules" in stage:
        stage, modules = _from_modules(stage, where)
    if ("models" in stage) == ("slices" in stage):
        raise UsageError(f"{where}: give exactly one of models or slices")
    base = (
        _model_ref(stage["base_model"], f"{where}: base_model") if stage.get("base_model") else None
    )
    translator = _Translator(method, where)
    choice, pad = _tokenizer_choice(stage, where)
    if "models" in stage:
        inputs, job_base, build = _models_plan(stage, method, base, translator, where)
    else:
        inputs, job_base, build = _slices_plan(stage, method, base, translator, where)
    if modules:
        build = _module_rules(modules, method, inputs, base, translator, build)
    translator.add(stage.get("parameters"), None, None, f"{where}: parameters")
    dtype = stage.get("out_dtype") or stage.get("dtype")
    exact = stage.get("mergekit_exact", True)
    if not isinstance(exact, bool):
        raise UsageError(f"{where}: mergekit_exact must be true or false")
    template = stage.get("chat_template")
    if template is not None:
        template = check_chat_template(template, where)
    build = _with_tokenizer(build, choice, pad, [job_base, *inputs], where, template)
    run_base, run_inputs, build = _expand_loras(job_base, inputs, build, where)
    return {
        "name": stage.get("name"),
        "plugin": plugin,
        "inputs": run_inputs,
        "base": run_base,
        "values": translator.values(),
        "dtype": dtype,
        "build": build,
        "config": stage,
        "extra": {"tokenizer_source": choice or "base", "mergekit_exact": exact},
        # mergekit computes in the config's dtype, else in each tensor's stored one
        "compute_dtype": (stage.get("dtype") or "stored") if exact else None,
    }


def _from_modules(stage: dict, where: str) -> tuple[dict, list]:
    """mergekit's ``modules``: one module is the model (its models or slices and
    parameters stand as the config's own); several (a multimodal model's text decoder,
    vision tower, projector) must merge the same models, each module's parameters
    applying under its weight prefix. Returns the stage as models/slices and, for
    several modules, (prefix, [(ref, parameters)], parameters, where) per module."""
    modules = stage["modules"]
    if "models" in stage or "slices" in stage:
        raise UsageError(f"{where}: give modules, or models or slices, not both")
    if not isinstance(modules, dict) or not modules:
        raise UsageError(f"{where}: modules must map module names to models or slices")
    for name, body in modules.items():
        w = f"{where}: modules.{name}"
        if not isinstance(body, dict) or ("models" in body) == ("slices" in body):
            raise UsageError(f"{w}: give exactly one of models or slices")
        _refuse_keys(body, _MODULE_KEYS, w)
    rest = {k: v for k, v in stage.items() if k != "modules"}
    if len(modules) == 1:
        (body,) = modules.values()
        params = {**(stage.get("parameters") or {}), **(body.get("parameters") or {})}
        return {**rest, **body, "parameters": params or None}, []
    plans, refs = [], None
    for name, body in modules.items():
        w = f"{where}: modules.{name}"
        if "slices" in body:
            raise UsageError(f"{w}: with several modules each must list models, not slices")
        if name not in MODULE_PREFIXES:
            known = ", ".join(MODULE_PREFIXES)
            raise UsageError(f"{w}: unknown module '{name}' (known: {known})")
        entries = body["models"]
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and "model" in e for e in entries
        ):
            raise UsageError(f"{w}: models must be a list of entries with a model")
        mine = [(_model_ref(e["model"], w), e.get("parameters")) for e in entries]
        if refs is None:
            refs = [r for r, _ in mine]
        elif sorted(r for r, _ in mine) != sorted(refs):
            raise UsageError(f"{w}: every module must merge the same models")
        plans.append((MODULE_PREFIXES[name], mine, body.get("parameters"), w))
    return {**rest, "models": [{"model": r} for r in refs]}, plans


def _module_rules(modules, method, inputs, base, translator, build):
    """Each module's parameters as rules under its prefix (before the config's own, so
    they win); layer positions counted within each module, as mergekit counts them."""
    for prefix, entries, params, where in modules:
        for ref, model_params in entries:
            if ref in inputs:
                k = inputs.index(ref)
            elif method.base_is_input and ref == base:
                k = len(inputs)
            else:
                continue  # the base's own parameters (mergekit ignores them too)
            translator.add(model_params, k, None, f"{where}: parameters", prefix)
        translator.add(params, None, None, f"{where}: parameters", prefix)
    prefixes = [m[0] for m in modules]

    def per_module(base_source, input_sources):
        from compressor.merging.params import layer_positions

        job = build(base_source, input_sources) if build else (base_source, input_sources, None)
        reference = job[0] if job[0] is not None else job[1][0]
        return job[0], job[1], layer_positions(reference.names(), prefixes)

    return per_module


def _models_plan(stage, method, base, translator, where):
    models = stage["models"]
    if not isinstance(models, list) or not models:
        raise UsageError(f"{where}: models must be a non-empty list")
    entries = []
    for j, entry in enumerate(models):
        w = f"{where}: models[{j}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise UsageError(f"{w} needs a model")
        _refuse_keys(entry, {"model", "parameters"}, w)
        entries.append((_model_ref(entry["model"], w), entry.get("parameters"), w))
    experts = [e for e in entries if e[0] != base]
    base_entry = [e for e in entries if e[0] == base]
    if method.base_is_input and base is not None and not experts:
        # the base is the only model (mergekit returns it): it is the one input
        experts, base_entry, base = base_entry or [(base, None, f"{where}: base_model")], [], None
    if method.name == "passthrough" and base is not None:
        raise UsageError(f"{where}: passthrough takes no base_model")
    positions = list(experts)
    if method.base_is_input and base is not None:
        positions.append(base_entry[0] if base_entry else (base, None, f"{where}: base_model"))
    for k, (_, params, w) in enumerate(positions):
        translator.add(params, k, None, f"{w}: parameters")
    # the base's own parameters matter only where it is an input (mergekit ignores the rest)
    return [e[0] for e in experts], base, None


def _slices_plan(stage, method, base, translator, where):
    slices = stage["slices"]
    if not isinstance(slices, list) or not slices:
        raise UsageError(f"{where}: slices must be a non-empty list")
    layout = []  # per slice: (base source or None, [expert sources]); a source: (ref, start, end)
    out_layer = 0
    for j, sl in enumerate(slices):
        w = f"{where}: slices[{j}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise UsageError(f"{w} needs a list of sources")
        _refuse_keys(sl, _SLICE_KEYS, w)
        slice_base = (
            _model_ref(sl["base_model"], f"{w}: base_model") if sl.get("base_model") else base
        )
        sources = []
        for k, src in enumerate(sl["sources"]):
            ws = f"{w}.sources[{k}]"
            if not isinstance(src, dict) or "model" not in src:
                raise UsageError(f"{ws} needs a model")
            _refuse_keys(src, _SOURCE_KEYS, ws)
            rng = src.get("layer_range")
            if (
                not isinstance(rng, list)
                or len(rng) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
                or not 0 <= rng[0] < rng[1]
            ):
                raise UsageError(f"{ws}: layer_range must be [start, end] with 0 <= start < end")
            sources.append(
                (_model_ref(src["model"], ws), rng[0], rng[1], src.get("parameters"), ws)
            )
        lengths = {s[2] - s[1] for s in sources}
        if len(lengths) != 1:
            raise UsageError(f"{w}: every source of a slice must have the same number of layers")
        length = lengths.pop()
        base_src = [s for s in sources if s[0] == slice_base] if slice_base else []
        others = [s for s in sources if s not in base_src]
        if method.base_is_input:
            others, base_src = others + base_src, []
        if method.needs_base and not base_src:
            raise UsageError(f"{w}: {method.name} needs the base model among the slice's sources")
        first, last = j == 0, j == len(slices) - 1
        lo = -1 if first else out_layer
        hi = POST_SLOT + 1 if last else out_layer + length
        for k, s in enumerate(others):
            translator.add(s[3], k, (lo, hi), f"{s[4]}: parameters")
        translator.add(sl.get("parameters"), None, (lo, hi), f"{w}: parameters")
        layout.append((base_src[0] if base_src else None, others, out_layer, length))
        out_layer += length
    counts = {len(entry[1]) for entry in layout}
    if len(counts) != 1:
        raise UsageError(f"{where}: every slice must have the same number of non-base sources")
    refs = list(dict.fromkeys(s[0] for _, others, _, _ in layout for s in others))
    base_refs = {b[0] for b, _, _, _ in layout if b is not None}
    if len(base_refs) > 1:
        raise UsageError(f"{where}: slices with different base models are not supported")
    job_base = base_refs.pop() if base_refs else None

    def build(base_source, input_sources):
        by_ref = dict(zip(refs, input_sources, strict=True))
        if job_base is not None:
            by_ref[job_base] = base_source
        return stacked(layout, by_ref, out_layer, where)

    return refs, job_base, build


def _tokenizer_choice(stage: dict, where: str) -> tuple[str | None, int | None]:
    """(tokenizer source or None, pad_to_multiple_of) from ``tokenizer_source`` or a
    ``tokenizer`` block (whose source defaults to ``union``, as in mergekit)."""
    if "tokenizer_source" in stage and "tokenizer" in stage:
        raise UsageError(f"{where}: give tokenizer_source or tokenizer, not both")
    pad = None
    if "tokenizer" in stage:
        block = stage["tokenizer"]
        if not isinstance(block, dict):
            raise UsageError(f"{where}: tokenizer must be a mapping (source, pad_to_multiple_of)")
        _refuse_keys(block, _TOKENIZER_KEYS, f"{where}: tokenizer")
        choice = block.get("source", "union")
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise UsageError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer")
    else:
        choice = stage.get("tokenizer_source")
    if choice is not None and (not isinstance(choice, str) or not choice.strip()):
        raise UsageError(f"{where}: tokenizer_source must be base, union or a model")
    return choice, pad


def _with_tokenizer(
    build, choice: str | None, pad: int | None, refs: list, where: str, template=None
):
    """The job's sources seen through one vocabulary. Without a tokenizer source the
    models' tokenizers must be the same (rows are merged by token id as they are); with
    one, every token-indexed tensor is moved to its vocabulary
    (:mod:`compressor.merging.vocabulary`). ``refs`` name the base (or None) and the inputs;
    ``template`` is the config's checked chat_template, set on the output's tokenizer."""
    from compressor.merging.vocabulary import aligned_sources, token_id_rules

    if choice not in (None, "base", "union") and choice not in refs:
        raise UsageError(f"{where}: tokenizer_source '{choice}' is not one of the models")

    def checked(base_source, input_sources):
        sources = [base_source, *input_sources]
        models = [s for s in sources if s is not None]
        if choice is None:
            rules = [token_id_rules(s) for s in models]
            differ = [
                rel
                for rel in dict.fromkeys(r for rule in rules for r in rule)
                if any(rule.get(rel) != rules[0].get(rel) for rule in rules)
            ]
            if differ:
                raise UsageError(
                    f"{where}: the models' tokenizers differ ({differ[0]}); set "
                    "tokenizer_source (base, union or one of the models) to merge them"
                )
        if build is None:
            job = base_source, input_sources, None
        else:
            job = build(base_source, input_sources)
        if choice is not None:
            picked = choice
            if choice not in ("base", "union"):
                picked = models.index(sources[refs.index(choice)])
            aligned = aligned_sources(job[0], job[1], models, base_source, picked, where, pad)
            job = (*aligned, job[2])
        if template is not None:
            _set_chat_template(job, template, models, where)
        return job

    return checked


def _set_chat_template(job, template: str, models: list, where: str) -> None:
    """Give the source the output's files are carried from the chat template."""
    import tempfile

    text = resolve_template(template, models)
    if text is None:
        return  # auto, and no model carries one: mergekit leaves the tokenizer as it is
    carrier = job[0] if job[0] is not None else job[1][0]
    if "tokenizer_config.json" not in carrier.files:
        warn(f"{where}: chat_template is not saved: the output has no tokenizer")
        return
    carrier._template_dir = tempfile.TemporaryDirectory(prefix="compress-template-")
    with_chat_template(carrier, text, Path(carrier._template_dir.name))
