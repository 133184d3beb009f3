"""Allocator tuning for a training process on Linux/glibc."""

from __future__ import annotations


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 1 GiB for reuse instead of returning them to the system.

    By default a block over 32 MiB is mmap'ed on allocation and unmapped on free, so every logits
    chunk and activation of every micro-batch is faulted in (and zeroed by the kernel) again:
    measured on SmolLM2, 2 cores, a training step ran 1.3x faster with this (the chunked loss 2x).
    The resident memory stays at its peak instead of shrinking between steps, which a training
    process reaches on every step anyway. Linux/glibc only; elsewhere nothing happens."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, ctypes.c_int(1 << 30))  # M_TRIM_THRESHOLD
        libc.mallopt(-3, ctypes.c_int(1 << 30))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


__all__ = ["keep_freed_memory"]
