"""compressor: compress, merge and reshape neural-network weights, with a versioned store.

The Python API runs the same code as the ``compress`` command::

    import compressor
    tv = compressor.apply("task-vector", "finetuned/", base="base/")
    merged = compressor.merge("task-arithmetic", [tv.id, "other/"], base="base/",
                              options={"scale": 0.5})
    compressor.export(merged.id, "merged-model/")
"""

import importlib

# name -> module: resolved on first use, so ``import compressor`` (and the CLI's start-up)
# loads neither torch nor transformers
_LAZY = {
    # the API: what the commands run
    "apply": "api",
    "evaluate": "api",
    "export": "api",
    "extract": "api",
    "import_path": "api",
    "merge": "api",
    "run_method": "api",
    "sample": "api",
    "train": "api",
    # the plugin contract: what a plugin imports (``from compressor import Method, ...``)
    "CompressorError": "errors",
    "InputError": "errors",
    "OptionError": "errors",
    "UsageError": "errors",
    "hookimpl": "hookspecs",
    "Job": "method",
    "Manifest": "method",
    "Method": "method",
    "Option": "method",
    "TensorSource": "io.sources",
    "DecodedSource": "io.sources",
    "SourceReader": "io.sources",
    "open_safetensors_file": "io.sources",
    "row_blocks": "io.sources",
    "TensorMerge": "merging.loop",
    "Task": "learning.tasks",
    "Trainer": "learning.training",
    "source_model": "models.modeling",
    "run_blockwise": "models.blockwise",
    "describe_content": "io.contents",
    # references and the store
    "resolve": "app.refs",
    "open_copied_artifact": "app.refs",
    "open_store": "store",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compressor' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
