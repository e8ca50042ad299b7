"""Running a method: resolve the inputs, run the method into a writer, commit the
artifact (or hand it to a plan's driver), with its lineage; and ``store import``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.app.refs import resolve
from compressor.app.scale_auto import val_scorer
from compressor.errors import UsageError
from compressor.io import devices, outdir
from compressor.io.contents import describe_content
from compressor.io.integrity import check_digest
from compressor.io.safetensors import dtype_from_name
from compressor.io.sources import TensorSource
from compressor.io.writer import DEFAULT_MAX_SHARD_SIZE, ArtifactWriter, StoredFile
from compressor.merging.loop import TensorMerge, check_full_models, settle_merge_options
from compressor.method import Job, check_count
from compressor.registry import get_registry
from compressor.reporting import make_progress, warn
from compressor.store import ArtifactRecord, Store, check_name, derive_name, opened_store

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    pass

Options = dict | Sequence[tuple[str, str]] | None


def _default_name(method_name: str, labels: list[str]) -> str:
    if len(labels) != 1:
        return f"{method_name}-merge"
    return derive_name(f"{Path(labels[0].split('@')[0]).name}.{method_name}")


@dataclasses.dataclass
class ConfigStage:
    """What a mergekit config's stage adds to a run: ``values``, options already checked;
    ``build(base, inputs)``, the resolved sources turned into the job's (base, inputs,
    layer positions): slices restacked, vocabularies aligned, LoRAs added; ``extra`` for
    the manifest; ``compute_dtype`` (a dtype name, or "stored") to compute as mergekit."""

    values: dict
    build: Callable | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str | None = None


@dataclasses.dataclass
class PlanStep:
    """What a plan's worker adds to a run: ``reuse`` an artifact the same method version
    made from the same inputs with the same options; ``publish`` the blobs without the
    catalog rows (the driver commits the :class:`PendingArtifact`); run ``part`` (k, n) of
    a merge split by tensor, whose artifact holds one shard (:func:`join_parts`)."""

    reuse: bool = True
    publish: bool = True
    part: tuple[int, int] | None = None


@dataclasses.dataclass
class RunRequest:
    """One run of a method: what the command line says (``dtype`` casts the written float
    tensors), and what a config's stage or a plan's step adds."""

    kind: str
    plugin: str
    inputs: list[str]
    base: str | None = None
    options: Options = None
    name: str | None = None
    dtype: str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    config: ConfigStage | None = None
    plan: PlanStep | None = None


def run_method(
    kind: str,
    plugin: str,
    inputs: Sequence[str],
    *,
    store: Store | str | Path | None = None,
    quiet: bool = True,
    **request,
) -> ArtifactRecord | PendingArtifact:
    """Run the ``kind`` method ``plugin`` on ``inputs`` and commit its artifact; the other
    keywords are :class:`RunRequest`'s (``base``, ``options``, ``name``, ``dtype``,
    ``max_shard_size``, ``config``, ``plan``)."""
    return run(RunRequest(kind, plugin, list(inputs), **request), store=store, quiet=quiet)


def run(
    request: RunRequest, *, store: Store | str | Path | None = None, quiet: bool = True
) -> ArtifactRecord | PendingArtifact:
    """Run a request and commit its artifact (with :class:`PlanStep` ``publish``: return
    the :class:`PendingArtifact` the plan's driver commits; with ``reuse``: an artifact
    made the same way before, if there is one)."""
    kind, plugin, inputs, base = request.kind, request.plugin, request.inputs, request.base
    options, name, dtype = request.options, request.name, request.dtype
    max_shard_size = request.max_shard_size
    config, plan = request.config, request.plan or PlanStep(reuse=False, publish=False)
    values = config.values if config else None
    build = config.build if config else None
    extra = {**config.extra} if config else None
    compute_dtype = config.compute_dtype if config else None
    reuse, publish, part = plan.reuse, plan.publish, plan.part
    method = get_registry().method(plugin, kind)
    if values is None and isinstance(method, TensorMerge):  # options may name experts (@N)
        values = method.parse_options(options or {}, method.input_labels(list(inputs), base))
    elif values is None:
        values = method.parse_options(options or {})
    out_dtype = dtype_from_name(dtype) if dtype is not None else None
    device = devices.resolve()  # a device that is not there: refused before any input opens
    if not method.uses_device:
        device = "cpu"  # this method computes on the CPU, and is recorded so
    if device == "mps" and (method.needs_float64 or (values or {}).get("space") == "core"):
        raise UsageError(
            f"method '{plugin}' computes in float64, which MPS does not have; use --device cpu"
        )
    scorer = None
    if isinstance(method, TensorMerge):
        settle_merge_options(method, values)  # a config's values too
        scorer = val_scorer(values, device)  # the val file read and checked before any work
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
        if reuse and dtype is None and extra is None and scorer is None:  # hashes inputs up front
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
                score=scorer,
                device=device,
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
                manifest={
                    **manifest.extra,
                    **space_extra,
                    **(extra or {}),
                    **({"compute": devices.describe(device)} if device != "cpu" else {}),
                },
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
