"""Process memory: peak resident size, and handing freed heap back to the OS."""
from __future__ import annotations

import resource

GiB = 2**30


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM where Linux has it: `ru_maxrss` includes the
    parent's RSS at fork time (carried over exec), which overstates a worker's own peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_LIBC = None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`).

    Each layer allocates and frees hundreds of MB in mid-sized blocks (weights, casts, fp64
    temporaries, safetensors headers) between small long-lived objects; glibc keeps the freed
    pages, so without this RSS creeps up with the number of layers processed although nothing
    stays live (measured: +1.1 GiB over 400 layers of the 12 GiB bench model). A no-op
    where there is no glibc."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False
