"""ROS 2 node processes. Importing this package sets process-wide library settings first."""
import os

# oneDNN keeps up to 1024 compiled matmul primitives by default, one per weight shape and batch
# size, each with its scratch memory: with packed kernels the prompts' many lengths grew a chunk
# node by ~25 MB. 64 holds every shape a decode step and a few prompt lengths use (no slowdown
# measured at 32; with none cached a forward took 1.7x as long).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
