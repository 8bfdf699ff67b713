"""The one device resolver: "auto" | "cpu" | "cuda" | "cuda:N" -> the device that will be used, or a clear error.

Used by the encoder (where torch runs) and by the embedded backend's search (FAISS on CPU or GPU, or the exact
torch search). torch is imported only when CUDA is asked about, so a numpy-only caller never pays for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from siamesedb.errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
_CUDA = re.compile(r"cuda(:\d+)?")


def torch_cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device: object = "auto", gpu_available: Callable[[], bool] = torch_cuda_available) -> str:
    """"cpu", "cuda" or "cuda:N". "auto" picks CUDA when `gpu_available()` says a GPU can be used, else the CPU;
    asking for CUDA where none can be used, or for an unknown device, raises DeviceError (one line; an EncoderError and an InvalidInputError)."""
    text = str(device)  # a torch.device prints as "cpu" / "cuda:0"
    if text == "auto":
        return "cuda" if gpu_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if _CUDA.fullmatch(text):
        if not gpu_available():
            raise DeviceError(f"device {text!r} asked for, but no CUDA device is available (use cpu or auto)")
        return text
    raise DeviceError(f"unknown device {text!r} (use auto, cpu, cuda or cuda:N)")
