"""ROS 2 node processes. Importing this package sets process-wide library settings first."""
import ctypes
import ctypes.util
import os

# oneDNN keeps up to 1024 compiled matmul primitives by default, each with scratch memory; 64
# holds every shape a decode step and a few prompt lengths use.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8      # glibc mallopt parameters


def _tune_malloc(arenas: int = 2, mmap_threshold: int = 1 << 20) -> None:
    """Tune glibc's allocator: it gives each thread that allocates its own heap ("arena"), up to
    8 per core: the coordinator's executor threads (one per waiting caller) fragment memory across them. And
    glibc raises its mmap threshold each time a large block is freed, so the megabyte-sized
    temporaries of loading (de-quantized matrices being re-quantized) end up in the heap and
    fragment it for good; a fixed 1 MiB threshold maps them and returns them when freed.
    No-op on other C libraries.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, arenas)
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    except (OSError, AttributeError):
        pass


_tune_malloc()
