"""The scorer ``-o scale auto`` hands the merge loop: ``eval``'s metric on ``-o val``.

Labelled rows are scored by accuracy (higher is better), text lines by perplexity
(lower is better), exactly as ``compress eval`` scores them; the file is read and
checked before anything is merged. Which options go together is settled with the
merge's other options (:func:`compressor.merging.loop.settle_merge_options`).
"""

from __future__ import annotations

from collections.abc import Callable

from compressor.errors import OptionError


def val_scorer(values: dict, device: str = "cpu") -> Callable | None:
    """(source → (metric, value, higher is better)) for the merge's ``val`` file, or None;
    each candidate model runs on ``device``."""
    if values.get("scale") != "auto":
        return None
    from compressor.app.evaluate import check_request, score
    from compressor.reporting import make_progress

    eval_values, examples, task = check_request({"data": values["val"]})
    if task not in ("classify", "lm"):
        raise OptionError(f"{values['val']}: scale auto scores labelled rows or text lines")
    metric = "accuracy" if task == "classify" else "perplexity"

    def scorer(source):
        metrics = score(
            source, task, examples, eval_values, make_progress(quiet=True), device=device
        )
        return metric, metrics[metric], metric == "accuracy"

    return scorer
