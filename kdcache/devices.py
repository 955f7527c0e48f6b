"""Where models run: the device, mixed precision and memory layout.

The dump, the training loop and the audit all run timm models on uint8 crops;
they share these helpers so that a batch reaches a model the same way in
each of them.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from .augment import Preprocess, normalize
from .errors import KdcacheError

T = TypeVar("T", torch.Tensor, nn.Module)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdcacheError(f"--device {name} was asked for, but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise KdcacheError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'") from None


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bfloat16 where the GPU supports it, else float16; None on CPU or when off."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def channels_last(obj: T, device: torch.device) -> T:
    """A model or a batch in channels_last memory on CUDA, where convolutions run faster so; as is elsewhere."""
    if device.type != "cuda":
        return obj
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last)
    return obj.contiguous(memory_format=torch.channels_last)


def model_input(images: torch.Tensor, prep: Preprocess, device: torch.device) -> torch.Tensor:
    """uint8 crops (B,3,S,S), or a recipe's normalised float views, as the float input of a model on `device`."""
    return channels_last(normalize(images.to(device, non_blocking=True), prep), device)
