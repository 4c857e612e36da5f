"""Augmentations of stored-token training pairs (stage ``rerank``, ``rerank_source: tokens``).

The stored tokens are (T, 131): x, y (normalised by max(H, W)), score, 128-d feature. Without the
images, a viewpoint change can still be imitated on the geometry the reranker sees: a random
homography near the identity moves the candidate's token positions, the features staying as
they are (a photometric change needs the images, so it is not offered here)::

    candidate tokens (B, T, 131) ──► per pair: H = homography(corners + U(-s, s)) ──► x, y := H(x, y)
    padding rows (all zero) stay zero, so they still read as padding

``TrainConfig.augment = "homography"`` turns it on, ``augment_scale`` is s (a fraction of the
image's longer side).
"""
from __future__ import annotations

import numpy as np

AUGMENTS = ("none", "homography")


def random_homographies(rng: np.random.Generator, n: int, scale: float, width: float = 1.0,
                        height: float = 1.0) -> np.ndarray:
    """(n, 3, 3) homographies mapping the image rectangle's corners to corners moved by up to
    ``scale`` (uniform, each coordinate); ``scale = 0`` gives identities."""
    src = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    out = np.empty((n, 3, 3))
    for i in range(n):
        dst = src + rng.uniform(-scale, scale, size=(4, 2))
        out[i] = _homography(src, dst)
    return out


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The exact homography of four point correspondences (direct linear transform, h33 = 1)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b.extend([u, v])
    h = np.linalg.solve(np.asarray(a), np.asarray(b))
    return np.append(h, 1.0).reshape(3, 3)


def warp_token_positions(tokens: np.ndarray, homographies: np.ndarray) -> np.ndarray:
    """A copy of ``tokens`` (B, T, 131) with each pair's x, y mapped by its homography (B, 3, 3);
    padding rows (all zero) untouched."""
    out = np.array(tokens, copy=True)
    xy = out[:, :, :2].astype(np.float64)
    ones = np.ones(xy.shape[:2] + (1,))
    p = np.einsum("bij,btj->bti", homographies, np.concatenate([xy, ones], 2))
    warped = p[:, :, :2] / p[:, :, 2:3]
    valid = np.any(out != 0, axis=2)
    out[:, :, :2] = np.where(valid[:, :, None], warped, xy).astype(out.dtype)
    return out


def augment_candidates(tokens: np.ndarray, kind: str, scale: float, rng: np.random.Generator,
                       aspect: float = 1.0) -> np.ndarray:
    """The training step's hook: ``kind`` "none" returns ``tokens`` itself. ``aspect`` = H / W of the
    extraction size (positions span [0, 1] x [0, aspect] for a landscape image)."""
    if kind == "none":
        return tokens
    if kind != "homography":
        raise ValueError(f"unknown augment {kind!r}; choose one of {AUGMENTS}")
    w, h = (1.0, aspect) if aspect <= 1 else (1.0 / aspect, 1.0)
    return warp_token_positions(tokens, random_homographies(rng, len(tokens), scale, w, h))
