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
    "apply": "api",
    "export": "api",
    "extract": "api",
    "import_path": "api",
    "merge": "api",
    "run_method": "api",
    "sample": "api",
    "train": "api",
    "CompressorError": "errors",
    "hookimpl": "hookspecs",
    "Job": "method",
    "Manifest": "method",
    "Method": "method",
    "Option": "method",
    "resolve": "refs",
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
