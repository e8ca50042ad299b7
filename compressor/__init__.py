"""compressor: compress, merge and reshape neural-network weights, with a versioned store.

The Python API runs the same code as the ``compress`` command::

    import compressor
    tv = compressor.apply("task-vector", "finetuned/", base="base/")
    merged = compressor.merge("task-arithmetic", [tv.id, "other/"], base="base/",
                              options={"scale": 0.5})
    compressor.export(merged.id, "merged-model/")
"""

from .api import apply, export, extract, merge, run_method, sample
from .errors import CompressorError
from .hookspecs import hookimpl
from .method import Job, Manifest, Method, Option
from .refs import resolve
from .store import open_store

__all__ = [
    "CompressorError",
    "Job",
    "Manifest",
    "Method",
    "Option",
    "apply",
    "export",
    "extract",
    "hookimpl",
    "merge",
    "open_store",
    "resolve",
    "run_method",
    "sample",
]
