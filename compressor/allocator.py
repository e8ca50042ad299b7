"""Process-wide allocator settings for streaming work on glibc.

Streaming allocates and frees same-sized multi-MB blocks (reads, temporaries)
thousands of times. glibc serves those with fresh mmaps and unmaps them on
free, so every block page-faults its memory in again: a fifth of the wall time
of a compress pass went to the kernel. Raising the mmap and trim thresholds
lets freed blocks be reused from the heap. Peak memory is unchanged (the live
set is the same); only the CLI calls this, library users keep their settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: blocks up to 32 MB come from the heap
TRIM_THRESHOLD = 256 << 20  # free heap kept for reuse before it is given back


def reuse_freed_blocks() -> bool:
    """Tell glibc to keep freed blocks for reuse; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
