"""``export``: any artifact (or a base plus a task vector, adapter or compressed expert)
to a directory transformers loads, or to a plain ``.safetensors`` file; staged and
renamed into place."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.app.refs import adapter_count, resolve
from compressor.errors import CompressorError, UsageError
from compressor.io import outdir
from compressor.io.contents import content_rules
from compressor.io.deltas import ModelFromDelta
from compressor.io.peft import CONFIG_FILE, PeftAdapter
from compressor.io.safetensors import dtype_from_name
from compressor.io.sources import TensorSource, copy_tensor
from compressor.io.writer import DEFAULT_MAX_SHARD_SIZE, ArtifactWriter
from compressor.reporting import make_progress, warn
from compressor.store import Store, opened_store

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

from compressor.app.runs import _carry_files, check_model


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
