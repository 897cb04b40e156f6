"""Where to run: the one rule that turns a device name from a flag or a config into a device."""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The device ``spec`` names.

    ``"auto"`` is ``cuda:local_rank`` when CUDA is available, else the CPU; ``"cuda"`` is
    ``cuda:local_rank`` (the process's own GPU under ``torchrun``); anything else is passed
    to ``torch.device`` (``"cpu"``, ``"cuda:1"``, ``"mps"``...).

    Raises:
        ValueError: the name is not a device, or CUDA is asked for and not available.
    """
    if isinstance(spec, torch.device):
        device = spec
    else:
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        if spec == "cuda":
            spec = f"cuda:{local_rank}"
        try:
            device = torch.device(spec)
        except RuntimeError as err:
            raise ValueError(f"device {spec!r} is not a device name ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for but CUDA is not available; use cpu")
    return device
