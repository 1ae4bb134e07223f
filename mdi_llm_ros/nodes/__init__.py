"""ROS 2 node processes. Importing this package sets process-wide library settings first."""
import ctypes
import ctypes.util
import os

# oneDNN keeps up to 1024 compiled matmul primitives by default, one per weight shape and batch
# size, each with its scratch memory: with packed kernels the prompts' many lengths grew a chunk
# node by ~25 MB. 64 holds every shape a decode step and a few prompt lengths use (no slowdown
# measured at 32; with none cached a forward took 1.7x as long).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own heap ("arena"), up to 8 per core; the
    coordinator's executor threads (one per waiting caller) fragmented ~23 MB across them
    (K=1 bench, 16 callers: peak 565 -> 542 MB with two arenas). No-op on other C libraries."""
    M_ARENA_MAX = -8
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


_limit_malloc_arenas()
