"""Flash Memory (Flash-VStream's CSM + DAM) in pure torch: no ROS, no transformers.

    mem = FlashMemory(MemoryConfig(), device="cuda")
    snap = mem.update(low, full, stamps)   # low [B, Nl, C], full [B, Nf, C], stamps [B] seconds
    snap = mem.snapshot()                  # immutable MemorySnapshot, safe to hold across updates
    mem.save(path); mem = FlashMemory.load(path, device="cuda")

See docs/memory.md for the algorithm, the bounded bank's retention rule and the guarantees.
"""

from .memory import FORMAT_VERSION, FlashMemory, MemoryConfig, MemoryFileError, MemorySnapshot

__all__ = ["FORMAT_VERSION", "FlashMemory", "MemoryConfig", "MemoryFileError", "MemorySnapshot"]
