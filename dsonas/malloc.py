"""One glibc malloc arena for the whole process, so a buffer freed by one thread is reusable by all.

MXNet allocates and frees CPU buffers with plain malloc/free (1.9.1 has no CPU memory pool), mostly on its
engine's worker threads, and glibc gives every thread that allocates concurrently an arena of its own
(up to 8 per core). Memory freed into one arena only serves later allocations from that arena, so a graph
whose buffers are allocated afresh on every call (recompute mode, dsonas.recompute) reaches a peak resident
size that is roughly the sum of every arena's peak, and it creeps up from step to step. With one arena
the freed buffers serve every thread: at the paper's CIFAR shape in recompute mode the peak after a W and
a λ step fell from ~1550 to ~1290 MB, and after two of each from ~1750 to ~1360 MB (bench/README.md).
Allocations are few and large, so the arena's lock costs nothing measurable.

This module does not import mxnet: threads keep the arena they were given, so `tools/common.setup_threads`
calls it before mxnet (and its threads) start.
"""

import ctypes

M_ARENA_MAX = -8  # mallopt parameter number, from glibc's <malloc.h>


def single_arena():
    """mallopt(M_ARENA_MAX, 1) in glibc; False where there is no glibc (musl, macOS) or it refuses."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, 1))
