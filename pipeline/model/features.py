"""What every backbone returns, so that storage and reranking take any of them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Features:
    """``global_descriptor`` (B, 256) L2-normalised; ``local_tokens`` (B, T, 131) with columns
    x, y (cell centre / max(H, W)), attention-or-score in [0, 1], then the 128-d feature."""

    global_descriptor: torch.Tensor
    local_tokens: torch.Tensor

    def cpu_float(self) -> Features:
        return Features(self.global_descriptor.detach().float().cpu(), self.local_tokens.detach().float().cpu())


def normalize_images(u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) RGB -> float32 (B, 3, H, W) normalised with ImageNet mean/std."""
    x = u8
    if x.ndim != 4:
        raise ValueError(f"images must be 4-D, got shape {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
