"""The Python API. The CLI calls these same functions.

``apply``, ``merge``, ``extract`` and ``sample`` run a method and commit its
artifact; ``export`` writes any artifact (or base + task vector) to a directory
that transformers loads, or to a plain ``.safetensors`` file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import outdir
from .alignment import ModelFromDelta
from .contents import content_rules, describe_content
from .errors import CompressorError, UsageError
from .integrity import check_digest
from .merging import TensorMerge, check_full_models
from .method import Job, check_count
from .peft_adapter import CONFIG_FILE, PeftAdapter
from .plugin_manager import get_registry
from .progress import make_progress, warn
from .refs import adapter_count, resolve
from .safetensors_format import dtype_from_name
from .sources import TensorSource, copy_tensor
from .store import ArtifactRecord, Store, check_name, derive_name, opened_store
from .writer import DEFAULT_MAX_SHARD_SIZE, ArtifactWriter, StoredFile

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

Options = dict | Sequence[tuple[str, str]] | None


def _default_name(method_name: str, labels: list[str]) -> str:
    if len(labels) != 1:
        return f"{method_name}-merge"
    return derive_name(f"{Path(labels[0].split('@')[0]).name}.{method_name}")


def run_method(
    kind: str,
    plugin: str,
    inputs: Sequence[str],
    *,
    base: str | None = None,
    options: Options = None,
    name: str | None = None,
    store: Store | str | Path | None = None,
    quiet: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: str | None = None,
    values: dict | None = None,
    build=None,
    extra: dict | None = None,
    reuse: bool = False,
    publish: bool = False,
    part: tuple[int, int] | None = None,
    compute_dtype: str | None = None,
) -> ArtifactRecord | PendingArtifact:
    """Run the ``kind`` method ``plugin`` on ``inputs`` and commit its artifact.

    ``reuse`` returns an artifact the same method version made from the same inputs
    with the same options instead of running again (plans do this). ``publish``
    stores the blobs but not the catalog rows, and returns what the one catalog
    writer (a plan's driver) commits with :meth:`PendingArtifact.commit`.

    ``dtype`` casts the written float tensors. For ``compress merge --config``:
    ``values`` are options already checked, and ``build(base, inputs)`` turns the
    resolved inputs into the job's (base, inputs, layer positions), e.g. layers
    restacked by slices; ``extra`` goes into the artifact's manifest; ``compute_dtype``
    (a dtype name, or "stored") makes a merge compute as mergekit does in that dtype.

    ``part`` (k, n) runs part k of a merge split by tensor (a plan's ``split``): its
    artifact holds one shard (named the Hugging Face way) and the carried files, and
    :func:`join_parts` makes the n parts one artifact.
    """
    method = get_registry().method(plugin, kind)
    if values is None and isinstance(method, TensorMerge):  # options may name experts (@N)
        values = method.parse_options(options or {}, method.input_labels(list(inputs), base))
    elif values is None:
        values = method.parse_options(options or {})
    out_dtype = dtype_from_name(dtype) if dtype is not None else None
    if method.needs_base and base is None:
        raise UsageError(f"method '{plugin}' needs --base BASE")
    if build is None:
        check_count(method, plugin, len(inputs))
    if part is not None and (not isinstance(method, TensorMerge) or build is not None):
        raise UsageError(
            f"method '{plugin}' cannot be split by tensor "
            "(it is not a merge of each tensor on its own)"
        )
    if part is not None:
        max_shard_size = 1 << 62  # the part is the shard
    name = check_name(name if name is not None else _default_name(method.name, list(inputs)))
    with opened_store(store) as st, contextlib.ExitStack() as stack:
        resolved_base = resolve(st, base) if base is not None else None
        resolved = [resolve(st, ref, method.reads_raw) for ref in inputs]
        for r in [resolved_base, *resolved]:
            if r is not None:
                stack.callback(r.source.close)
        if resolved_base is not None:
            check_model(resolved_base, "a base")
        if isinstance(method, TensorMerge) and build is None:  # before any input is hashed
            check_full_models(method, resolved_base, [r.source for r in resolved])
        if reuse and dtype is None and extra is None:  # hashes external inputs up front
            parents = _parents(kind, resolved_base, resolved)
            same = st.find_same(method.kind, method.name, method.version, values, parents)
            if same is not None:
                return same
        space = _merge_space(resolved_base, resolved) if kind == "merge" else None
        job_base, job_inputs, space_extra = space or (
            resolved_base.source if resolved_base else None,
            [r.source for r in resolved],
            {},
        )
        positions = None
        if build is not None:
            job_base, job_inputs, positions = build(job_base, job_inputs)
            check_count(method, plugin, len(job_inputs))
        with st.tmp_dir() as tmp:
            writer = ArtifactWriter(tmp / "out", max_shard_size=max_shard_size, dtype=out_dtype)
            job = Job(
                base=job_base,
                inputs=job_inputs,
                options=values,
                writer=writer,
                progress=make_progress(quiet),
                warn=warn,
                positions=positions,
                part=part,
                compute_dtype=compute_dtype,
            )
            manifest = method.run(job)
            carry_from = job.base if kind == "merge" and job.base else job.inputs[0]
            # an adapter carries its own adapter_config.json, not the model's config.json
            skip = ("config.json",) if manifest.content == "adapter" else ()
            _carry_files(writer, carry_from, manifest.content, skip)
            files = writer.finish()
            for r in [resolved_base, *resolved]:
                if r is not None:
                    r.source.verify()  # a damaged stored input must not become a result
            parents = _parents(kind, resolved_base, resolved)  # inputs hashed while read
            pending = PendingArtifact(
                files,
                kind=method.kind,
                content=manifest.content,
                name=name,
                plugin=method.name,
                method_version=method.version,
                params=values,
                metrics=manifest.metrics,
                manifest={**manifest.extra, **space_extra, **(extra or {})},
                parents=parents,
                externals=[r.external for r in [resolved_base, *resolved] if r and r.external],
            )
            if part is not None:
                pending.part = _part_of(files, writer, part)
            if publish:
                pending.files = st.publish(pending.files)
                return pending
            return pending.commit(st)


def _parents(kind: str, base, inputs) -> list[tuple[str, str]]:
    """(artifact id, role) of a run's base and inputs, in order."""
    role = "expert" if kind == "merge" else "input"
    return ([(base.artifact_id, "base")] if base else []) + [(r.artifact_id, role) for r in inputs]


class PendingArtifact:
    """An artifact whose blobs are stored (or about to be) and whose catalog rows are not:
    the files and every :meth:`Store.commit` argument (and, for part of a split merge,
    ``part``: k, n, the tensor names its shard holds and their bytes)."""

    def __init__(self, files, **commit):
        self.files = files
        self.fields = commit
        self.part: dict | None = None

    def commit(self, st: Store) -> ArtifactRecord:
        """Add the artifact to the catalog (its blobs are moved in if not yet stored)."""
        return st.commit(self.files, **self.fields)


def _part_of(files: list, writer: ArtifactWriter, part: tuple[int, int]) -> dict:
    """Rename a part's one shard ``model-0000k-of-0000n.safetensors`` (in place: a store
    file's name is only its catalog row); what its tensors are, for the index."""
    k, n = part
    shard = f"model-{k:05d}-of-{n:05d}.safetensors"
    for i, f in enumerate(files):
        if f.relpath == "model.safetensors":
            files[i] = dataclasses.replace(f, relpath=shard)
    entries = writer.entries()
    return {
        "k": k,
        "n": n,
        "shard": shard,
        "names": [e.name for e in entries],
        "bytes": sum(e.nbytes for e in entries),
        "numel": sum(e.numel for e in entries),
    }


def join_parts(parts: list[PendingArtifact], tmp: Path) -> PendingArtifact:
    """One artifact from the n parts of a split merge: their shards, an index, the first
    part's other files. Metrics are the parts' means weighted by their elements (exact
    for fractions such as TIES' ``kept``; counts such as ``experts`` agree). The index
    is written in ``tmp`` (the store's temp space: committing moves it into place)."""
    parts = sorted(parts, key=lambda p: p.part["k"])
    first = parts[0]
    shards = [f for p in parts for f in p.files if f.relpath == p.part["shard"]]
    carried = [f for f in first.files if not f.relpath.endswith(".safetensors")]
    weight_map = {name: p.part["shard"] for p in parts for name in p.part["names"]}
    index = {
        "metadata": {"total_size": sum(p.part["bytes"] for p in parts)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    path = Path(tmp) / f"index-{os.getpid()}-{os.urandom(4).hex()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    index_file = StoredFile("model.safetensors.index.json", path, digest, len(data))
    numel = sum(p.part["numel"] for p in parts) or 1
    metrics = {}
    for key, value in first.fields["metrics"].items():
        values = [p.fields["metrics"].get(key) for p in parts]
        if all(v == value for v in values) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            metrics[key] = value
        else:
            weighted = zip(values, parts, strict=True)
            metrics[key] = sum(v * p.part["numel"] for v, p in weighted) / numel
    fields = {**first.fields, "metrics": metrics}
    fields["manifest"] = {**first.fields["manifest"], "parts": len(parts)}
    return PendingArtifact(
        sorted([*shards, index_file, *carried], key=lambda f: f.relpath), **fields
    )


def _merge_space(base, experts):
    """(base, experts, manifest extra) in the space the base's encoding merges in (a sketch's
    tables), when its method offers one and the experts share it; else None."""
    encoding = base.source.manifest.get("encoding") if base is not None else None
    method = get_registry().decoder(encoding) if encoding else None
    if method is None:
        return None
    return method.merge_space(base.source, [e.source for e in experts])


def check_model(resolved, role: str) -> None:
    """Refuse an input that is not a full model where one is required (``role``: "a base")."""
    content = resolved.source.content
    if content != "model":
        raise UsageError(
            f"{resolved.label} holds {describe_content(content)}, not a model; {role} must be "
            "a full model"
        )


def _carry_files(
    writer: ArtifactWriter, source: TensorSource, content: str, skip: tuple[str, ...] = ()
) -> None:
    """Copy config, tokenizer and module files from the source unless the method wrote its own."""
    if source.content == "adapter" and content != "adapter":
        return
    for rel, path in source.files.items():
        if rel in skip or rel == outdir.MARKER or (writer.dir / rel).exists():
            continue
        stored = writer.add_file(rel, path)
        check_digest(path, stored.digest, source.label, rel)


def import_path(
    path: str | Path, *, name: str | None = None, store: Store | str | Path | None = None
) -> ArtifactRecord:
    """Copy a model, adapter or ``.safetensors`` file into the store (``store import``)."""
    with opened_store(store) as st:
        resolved = resolve(st, str(path))
        resolved.source.close()
        ext = resolved.external
        if ext is None:
            raise UsageError(f"{path} is already in the store; import takes a path")
        single = ext.path.is_file()
        inputs = {"model.safetensors": ext.path} if single else dict(ext.files)
        stem = ext.path.name.removesuffix(".safetensors")
        with st.tmp_dir() as tmp:
            writer = ArtifactWriter(tmp / "import")
            for rel, p in inputs.items():
                writer.add_file(rel, p)
            files = writer.finish()
            ext.digests = {inputs[f.relpath]: f.digest for f in files}  # hashed while copied
            return st.commit(
                files,
                kind="import",
                content=resolved.source.content,
                name=check_name(name if name is not None else derive_name(stem, "imported")),
                params={"path": str(ext.path)},
                manifest={"fingerprint": ext.fingerprint},
                parents=[(ext.id, "source")],
                externals=[ext],
            )


def apply(
    plugin: str, input: str | Sequence[str], *, base: str | None = None, **kw
) -> ArtifactRecord:
    """Run a compress method on one input, or several for methods that take them."""
    inputs = [input] if isinstance(input, (str, Path)) else list(input)
    return run_method("compress", plugin, inputs, base=base, **kw)


def merge(plugin: str, experts: Sequence[str], *, base: str, **kw) -> ArtifactRecord:
    """Merge experts into one model (``compress merge``)."""
    return run_method("merge", plugin, list(experts), base=base, **kw)


def extract(plugin: str, model: str, **kw) -> ArtifactRecord:
    """Cut a submodel from a model (``compress extract``)."""
    return run_method("extract", plugin, [model], **kw)


def sample(plugin: str, artifact: str, **kw) -> ArtifactRecord:
    """Sample weights from a learned artifact (``compress sample``)."""
    return run_method("sample", plugin, [artifact], **kw)


def train(plugin: str, model: str, **kw) -> ArtifactRecord:
    """Train a model, or an artifact learned from it, on data (``compress train``)."""
    return run_method("train", plugin, [model], **kw)


def evaluate(
    ref: str,
    options=None,
    *,
    base: str | None = None,
    store=None,
    quiet: bool = True,
    record: bool = True,
    resolved=None,
) -> dict:
    """Score REF (added to BASE, for a task vector or adapter) on data (``compress eval``);
    store the scores as its metrics (``NAME:DATA``) and return them. Without ``record``
    nothing is stored: the result's ``metrics_for`` holds (artifact id, metrics,
    externals, requests) for the catalog's writer to store; ``requests`` maps DATA to
    :func:`~compressor.evaluate.request_digest` (which scores a rerun may reuse).
    ``resolved``: REF already opened by :func:`~compressor.refs.resolve` (closed here)."""
    from .evaluate import check_request, request_digest, score
    from .modeling import model_source

    values, examples, task = check_request(options)
    progress = make_progress(quiet)
    with opened_store(store) as st:
        with contextlib.ExitStack() as stack:
            source, resolved = stack.enter_context(model_source(st, ref, base, resolved))
            reference = None
            if task == "embed":
                reference, _ = stack.enter_context(model_source(st, values["reference"]))
            metrics = score(source, task, examples, values, progress, reference)
            source.verify()  # scores from damaged blobs are not stored
        stem = Path(values["data"]).stem
        if resolved.select is not None:  # one adapter of a joint artifact: say which
            stem += f"#{resolved.select}"
        keyed = {f"{k}:{stem}": v for k, v in metrics.items()}
        externals = [resolved.external] if resolved.external else []
        requests = {stem: request_digest(values, base)}
        result = {"task": task, "data": str(values["data"]), **metrics}
        if not record:
            return {**result, "metrics_for": (resolved.artifact_id, keyed, externals, requests)}
        st.set_metrics(resolved.artifact_id, keyed, externals=externals, requests=requests)
    return result


def export(
    ref: str,
    out: str | Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    store: Store | str | Path | None = None,
    quiet: bool = True,
) -> Path:
    """Write an artifact (plus a base, for task vectors and adapters) to ``out``.

    ``out`` ending in ``.safetensors`` gives one plain file; anything else a
    directory with Hugging Face shard names, index and the carried files.
    """
    out = Path(out)
    with opened_store(store) as st:
        _check_output(out, force, st)
        count = adapter_count(st, ref)
        if count > 1:  # adapters compressed together: one PEFT directory each, OUT/1, ...
            if out.suffix == ".safetensors" or base is not None:
                raise UsageError(
                    f"{ref} holds {count} adapters; export them to a directory without --base, "
                    f"or one of them as {ref}#k"
                )
            out.mkdir(parents=True, exist_ok=True)
            for k in range(1, count + 1):
                export(f"{ref}#{k}", out / str(k), dtype=dtype, force=force, store=st, quiet=quiet)
            return out
        return _export_one(st, ref, out, base, dtype, max_shard_size, quiet)


def _check_output(out: Path, force: bool, st: Store) -> None:
    """Refuse an output path that exists, unless ``force`` and it is an earlier export."""
    outdir.clean_stale(out)
    if not (out.exists() or out.is_symlink()):
        return
    single_file = out.suffix == ".safetensors"
    if not force and (single_file or not out.is_dir() or any(out.iterdir())):
        raise CompressorError(f"{out} exists and is not empty (use --force to replace it)")
    if single_file and out.is_dir():
        raise CompressorError(f"{out} is a directory; give a file path ending in .safetensors")
    outdir.check_replaceable(out, [st.root])


def _export_one(st: Store, ref, out: Path, base, dtype, max_shard_size, quiet) -> Path:
    """Export one artifact (plus a base) to a staged directory or file, then publish it."""
    single_file = out.suffix == ".safetensors"
    cast = dtype_from_name(dtype) if dtype else None
    progress = make_progress(quiet)
    with contextlib.ExitStack() as stack:
        resolved = resolve(st, ref)
        source = resolved.source
        stack.callback(source.close)
        base_source = None
        if base is not None:
            if source.content == "model":
                raise UsageError(
                    f"{ref} is a full model; --base applies to task vectors, adapters "
                    "and compressed experts"
                )
            resolved_base = resolve(st, base)
            base_source = resolved_base.source
            stack.callback(base_source.close)
            check_model(resolved_base, "a base")
        content = "model" if base_source is not None else source.content
        tmp = outdir.staging_dir(out)
        try:
            prefix = "adapter_model" if content == "adapter" else "model"
            writer = ArtifactWriter(
                tmp,
                prefix=prefix,
                max_shard_size=(1 << 62) if single_file else max_shard_size,
                dtype=cast,
                content=content,
                hash_shards=False,
            )
            config_source = source if "config.json" in source.files else base_source
            if cast is not None and config_source is not None and not single_file:
                _write_config_dtype(writer, config_source, cast)
            if base_source is not None:
                summed = ModelFromDelta(base_source, source, warn)
                for name in progress(summed.names(), desc="export"):
                    copy_tensor(writer, summed, name)
                _carry_files(writer, source, "model")
                _carry_files(writer, base_source, "model")
            else:
                for name in progress(source.names(), desc="export"):
                    copy_tensor(writer, source, name)
                if not single_file:
                    if isinstance(source, PeftAdapter):  # the config its factors go with
                        writer.add_json(CONFIG_FILE, source.config_data)
                    # a task vector with a config.json would load in transformers as a model
                    skip = () if content_rules(content).has_config else ("config.json",)
                    _carry_files(writer, source, content, skip)
            if not single_file:
                writer.add_json(
                    outdir.MARKER,
                    outdir.marker(content, resolved.artifact_id, resolved.label, base),
                )
            written = writer.finish()
            for s in (source, base_source):
                if s is not None:
                    s.verify()
            if single_file:
                tensors = [f for f in written if f.relpath.endswith(".safetensors")]
                outdir.publish(tensors[0].path, out)
            else:
                outdir.publish(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_config_dtype(writer: ArtifactWriter, source: TensorSource, dtype: torch.dtype) -> None:
    """Record a cast in config.json so transformers loads the model in that dtype."""
    config = source.config()
    if config is None:
        return
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = name
    writer.add_json("config.json", config)
