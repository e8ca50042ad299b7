"""Reporting from long work: progress bars on stderr, and warnings the caller decides how to show.

Library code reports through these two; the CLI draws the bars (``--quiet`` hides them)
and prints each warning as one ``Warning: ...`` line. A Python caller gets ordinary
:mod:`warnings` (category :class:`CompressorWarning`), which it can filter or turn into errors.
"""

from __future__ import annotations

import sys
import warnings


class CompressorWarning(UserWarning):
    """Something a user should know that does not stop the work (a tensor kept dense...)."""


def warn(message: str) -> None:
    """Report a warning: a Python warning, which the CLI prints as ``Warning: message``."""
    warnings.warn(message, CompressorWarning, stacklevel=2)


def make_progress(quiet: bool):
    """A ``progress(iterable, desc=, total=)`` that draws on stderr after one second."""

    def progress(iterable, desc: str = "", total: int | None = None, unit: str = "tensor"):
        if quiet:
            return iterable
        from tqdm import tqdm

        return tqdm(
            iterable,
            desc=desc,
            total=total,
            unit=unit,
            delay=1.0,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    return progress
