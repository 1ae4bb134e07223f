"""ROS 2 node processes. Importing this package sets process-wide library settings first."""
import ctypes
import ctypes.util
import os

# oneDNN keeps up to 1024 compiled matmul primitives by default, each with scratch memory; 64
# holds every shape a decode step and a few prompt lengths use.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own heap ("arena"), up to 8 per core: the
    coordinator's executor threads (one per waiting caller) fragment memory across them.
    No-op on other C libraries."""
    M_ARENA_MAX = -8
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


_limit_malloc_arenas()
