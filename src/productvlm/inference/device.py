"""Device and dtype choice for inference (`auto`: the GPU when there is one, bfloat16 on it)."""

from __future__ import annotations


def pick_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


__all__ = ["pick_device", "pick_dtype"]
