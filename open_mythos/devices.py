"""Where to run: the one rule that turns a device name from a flag or a config into a device."""

from __future__ import annotations

import ctypes
from typing import Any

import torch


def resolve_device(spec: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The device ``spec`` names.

    ``"auto"`` is ``cuda:local_rank`` when CUDA is available, else the CPU; ``"cuda"`` is
    ``cuda:local_rank`` (the process's own GPU under ``torchrun``); anything else is passed
    to ``torch.device`` (``"cpu"``, ``"cuda:1"``, ``"mps"``...).

    Raises:
        ValueError: the name is not a device, CUDA is asked for and not available, or the
            GPU it names does not exist (more ``torchrun`` processes than GPUs, say).
    """
    by_rank = False
    if isinstance(spec, torch.device):
        device = spec
    else:
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        if spec == "cuda":
            spec, by_rank = f"cuda:{local_rank}", True
        try:
            device = torch.device(spec)
        except RuntimeError as err:
            raise ValueError(f"device {spec!r} is not a device name ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for but CUDA is not available; use cpu")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            hint = (f"local rank {local_rank} takes GPU {local_rank}: start at most {count} "
                    "processes per node (torchrun --nproc_per_node), or train on the CPU "
                    "(run.device=cpu)") if by_rank else f"GPUs are numbered 0..{count - 1}"
            raise ValueError(f"device {str(device)!r} asked for but this machine has {count} "
                             f"CUDA device(s); {hint}")
    if device.type == "meta":
        raise ValueError("device 'meta' holds no data, so nothing can run there: use cpu or cuda")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for but MPS is not available here (Apple GPUs "
                         "only); use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        try:  # xpu and others: usable only where this build and machine have one
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError, AttributeError) as err:
            why = (str(err).splitlines() or [type(err).__name__])[0][:160]
            raise ValueError(f"device {str(device)!r} is not available here ({why}); use "
                             "cpu or cuda") from None
    return device


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed memory in the process; True if it took effect.

    By default glibc serves large blocks with ``mmap`` and unmaps them on ``free``, and
    returns free memory at the top of the heap to the OS: a training step's large tensors
    (activations, gradients, the LM head's logits) are then page-faulted back in on every
    step, at ~0.6 ms per MB on the virtual machines measured. With ``mmap`` off and the trim
    threshold at its maximum, the process holds on to its peak memory and reuses it.
    Measured on the 63M step (``benchmarks/train.py``, 2 threads): 1.24 -> 1.09 s in fp32,
    1.41 -> 1.01 s in bf16. Process-wide until :func:`return_freed_memory`; a no-op (False)
    off glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    no_mmap = libc.mallopt(_M_MMAP_MAX, 0)
    no_trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    return bool(no_mmap) and bool(no_trim)


def return_freed_memory() -> bool:
    """Undo :func:`keep_freed_memory`: blocks of 32 MiB and more mapped apart and unmapped
    on ``free``, free memory above 64 MiB at the top of the heap trimmed, and the free
    memory the process holds now returned to the OS (``malloc_trim``). ``Trainer.train``
    calls it when it returns, so a notebook's process does not keep a run's peak memory for
    ever. True if it took effect; a no-op (False) off glibc.

    These are the limits glibc's own adaptive thresholds reach once a process has freed
    large blocks (its maximum mmap threshold on 64-bit, and twice that for trimming):
    after any ``mallopt`` of them glibc adapts no more, and its initial 128 KiB limits
    would map and unmap every tensor above 128 KiB (an 8 MB allocation loop ran ~40x
    slower than in a fresh process)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = [libc.mallopt(_M_MMAP_MAX, 65536),
          libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(32 * 2**20)),
          libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(64 * 2**20))]
    libc.malloc_trim(0)
    return all(ok)


# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _glibc() -> Any:
    """glibc through ctypes, or None elsewhere."""
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def cpp_compiler() -> str | None:
    """Path of the C++ compiler that inductor would build CPU kernels with (``$CXX``, else
    ``c++``, ``g++`` or ``clang++`` on the PATH), or None."""
    import os
    import shutil

    return next((path for name in (os.environ.get("CXX"), "c++", "g++", "clang++")
                 if name and (path := shutil.which(name))), None)


def compile_unavailable(device_type: str) -> str | None:
    """Why ``torch.compile`` (inductor) cannot build kernels for ``device_type``, or None
    when it can: the CPU needs a C++ compiler, CUDA needs Triton, other devices are not
    supported here."""
    if device_type == "cpu":
        return None if cpp_compiler() else "no C++ compiler on the PATH for inductor"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    return f"inductor is not used on {device_type!r} here"
