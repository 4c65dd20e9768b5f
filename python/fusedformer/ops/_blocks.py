"""The byte budget of large intermediates, shared by every op and layer that splits its work into
row blocks.

glibc's allocator serves a request over its mmap threshold (32 MiB) with a fresh ``mmap`` on every
call, and the page faults of such a buffer can cost more than the product that fills it (about
30 ms for a 38 MB buffer on a 2-core VM). Intermediates kept under :data:`MAX_BLOCK_BYTES` are
reused from the heap instead, and stay in the last-level cache between the passes over them.
"""

import torch

MAX_BLOCK_BYTES = 16 << 20


def fits(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """Whether a ``(rows, cols)`` buffer of ``dtype`` stays under :data:`MAX_BLOCK_BYTES`."""
    return rows * cols * dtype.itemsize <= MAX_BLOCK_BYTES


def row_blocks(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Rows per block (at least 1, at most ``rows``) so that a ``(block, cols)`` buffer of ``dtype``
    stays under :data:`MAX_BLOCK_BYTES`."""
    return max(1, min(rows, MAX_BLOCK_BYTES // max(1, cols * dtype.itemsize)))
