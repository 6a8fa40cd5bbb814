"""The server process's C heap. glibc gives every thread that allocates its own malloc arena (up
to 8 per core), and a server's many short-lived threads (one per response's audio, the request
workers) leave each arena fragmented: the resident size then grows with the traffic served, not
with --max-batch (measured: +0.5 GB per 30 requests, without end). Two arenas keep it flat."""

import ctypes
import platform

M_ARENA_MAX = -8  # glibc's mallopt parameter
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads started from now on; elsewhere (macOS, musl) nothing.
    True when the cap took effect."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
