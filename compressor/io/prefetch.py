"""Read the next piece of work while the current one computes on a device.

With a GPU doing the math, a streaming method waits on the disk between tensors; one
reader thread running a step ahead hides that wait (safetensors and torch copies release
the GIL). Reads keep their order, and only one read is in flight, so sources that hash
what they read see the same sequence. On the CPU the reads stay inline: two threads on
two cores would only slow the math down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], load: Callable[[T], R], ahead: bool) -> Iterator[tuple[T, R]]:
    """(item, load(item)) for each item; with ``ahead``, item k+1 loads in a reader thread
    while the caller works on item k (memory: two items' loads at once)."""
    if not ahead:
        for item in items:
            yield item, load(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="compressor-read") as pool:
        pending = None
        for item in it:
            pending = (item, pool.submit(load, item))
            break
        while pending is not None:
            item, future = pending
            nxt = next(it, _END)
            # the reader starts on the next item only once this one is loaded: in order
            loaded = future.result()
            pending = None if nxt is _END else (nxt, pool.submit(load, nxt))
            yield item, loaded


_END = object()
