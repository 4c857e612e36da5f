"""Queries become descriptors exactly as the store's images did: the model the store records
(``ModelKey``: backbone, checkpoint and its hash, image size), the same decode and resize
(``pipeline.images.decode_resize``), the same forward pass (``pipeline.extract.forward``) on the
device ``pipeline.device`` chooses, and the tokens rounded to the store's float16.

``ExtractionModels`` holds one model per key, so a state whose store records another model is
loaded beside the current one before the service switches to it. The Serve deployment
(``app.QueryExtractor``) batches concurrent requests into one forward pass through it; the
benchmark's in-process reference calls it directly.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..images import decode_resize
from ..log import get_logger
from .state import ModelKey

log = get_logger(__name__)


def decode_query(data: bytes, key: ModelKey) -> np.ndarray:
    """uint8 (H, W, 3) pixels of an uploaded image at the store's size (``ImageReadError`` if unreadable)."""
    pixels, _, _ = decode_resize(data, key.image_size)
    return pixels


class ExtractionModels:
    """One extraction model per ``ModelKey``, placed once; ``extract`` runs a batch of queries."""

    def __init__(self, device: str = "auto", threads: int | None = None):
        from ..device import choose_device, set_cpu_threads

        self.plan = choose_device(device)
        if not self.plan.is_cuda:
            set_cpu_threads(threads)
        self._models: dict[ModelKey, Any] = {}
        self._lock = threading.Lock()

    def load(self, key: ModelKey) -> None:
        from ..weights import build_model

        with self._lock:
            if key in self._models:
                return
            # R²Former's positional-embedding grid follows the image size; other backbones are size-free.
            kwargs = {"img_size": tuple(key.image_size)} if key.backbone == "r2former" else {}
            model = build_model(key.backbone, key.checkpoint,
                                expected_sha256=key.checkpoint_hash if key.checkpoint else None, **kwargs)
            self._models[key] = (model.place(self.plan) if hasattr(model, "place")
                                 else model.to(self.plan.device)).eval()
            log.info("serve: loaded %s on %s", key.as_dict(), self.plan.device)

    def keys(self) -> list[ModelKey]:
        return list(self._models)

    def extract(self, key: ModelKey, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) float32 global descriptors and (N, T, 131) float16 local tokens (as stored)."""
        from ..extract import forward

        self.load(key)
        desc, tokens = forward(self._models[key], pixels, max(1, len(pixels)), self.plan)
        return desc.astype(np.float32), tokens.astype(np.float16)
