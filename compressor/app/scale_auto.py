"""The scorer ``-o scale auto`` hands the merge loop: ``eval``'s metric on ``-o val``.

Labelled rows are scored by accuracy (higher is better), text lines by perplexity
(lower is better), exactly as ``compress eval`` scores them; the file is read and
checked before anything is merged.
"""

from __future__ import annotations

from collections.abc import Callable

from compressor.errors import OptionError


def check_val_options(method, values: dict) -> None:
    """``scale auto`` needs ``val``, a method that runs the loop, one scale, full space
    (``val`` and ``grid`` without ``scale auto`` are refused when options are parsed)."""
    scale = values.get("scale")
    if isinstance(scale, list) and "auto" in str(scale):
        raise OptionError("-o scale auto picks one scale for the whole merge")
    if scale != "auto":
        return
    if not any(o.name == "val" for o in method.options):
        raise OptionError(f"method '{method.name}' cannot pick its scale on data (-o scale auto)")
    if not values.get("val"):
        raise OptionError("-o scale auto needs -o val FILE: the data each scale is scored on")
    if values.get("space") == "core":
        raise OptionError("-o scale auto scores full models; with -o space core give a scale")


def val_scorer(values: dict, quiet: bool = True) -> Callable | None:
    """(source → (metric, value, higher is better)) for the merge's ``val`` file, or None."""
    if values.get("scale") != "auto":
        return None
    from compressor.app.evaluate import check_request, score

    eval_values, examples, task = check_request({"data": values["val"]})
    if task not in ("classify", "lm"):
        raise OptionError(f"{values['val']}: scale auto scores labelled rows or text lines")
    metric = "accuracy" if task == "classify" else "perplexity"

    def scorer(source):
        metrics = score(source, task, examples, eval_values, lambda x, **_: x)
        return metric, metrics[metric], metric == "accuracy"

    return scorer
