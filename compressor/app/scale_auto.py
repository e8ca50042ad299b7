"""The scorer ``-o scale auto`` hands the merge loop: ``eval``'s metric on ``-o val``.

Labelled rows are scored by accuracy (higher is better), text lines by perplexity
(lower is better), exactly as ``compress eval`` scores them; the file is read and
checked before anything is merged.
"""

from __future__ import annotations

from collections.abc import Callable

from compressor.errors import OptionError


def check_val_options(values: dict) -> None:
    """``val`` and ``grid`` go with ``scale auto`` only; ``scale auto`` needs ``val``."""
    if "val" not in values:
        if values.get("scale") == "auto":
            raise OptionError("this method's scale cannot be picked on data (-o scale auto)")
        return
    auto = values.get("scale") == "auto"
    if isinstance(values.get("scale"), list) and "auto" in str(values["scale"]):
        raise OptionError("-o scale auto picks one scale for the whole merge")
    if auto and not values.get("val"):
        raise OptionError("-o scale auto needs -o val FILE: the data each scale is scored on")
    if not auto and values.get("val"):
        raise OptionError("option 'val' applies to -o scale auto only")
    if values.get("space") == "core" and auto:
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
