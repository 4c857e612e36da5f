"""R²Former and a second offline-pretrained backbone, in pure PyTorch (no Ray, no remote storage).

Every model here offers the same API::

    feats = model.extract(images)            # images: (B, 3, H, W) ImageNet-normalised float
    feats.global_descriptor                   # (B, 256), L2-normalised
    feats.local_tokens                        # (B, T, 131): x, y, score, 128-d feature
    logits = model.rerank_logits(q, c)        # (P, T, 131) twice -> (P, 2); score = softmax[:, 1]
    model.has_trained_reranker                # False when the reranker weights are untrained
"""
from .efficientnet import EfficientNetLite0VPR
from .features import IMAGENET_MEAN, IMAGENET_STD, Features, normalize_images
from .r2former import R2Former
from .registry import BACKBONES, build_model

__all__ = ["R2Former", "EfficientNetLite0VPR", "Features", "normalize_images", "build_model", "BACKBONES",
           "IMAGENET_MEAN", "IMAGENET_STD"]
