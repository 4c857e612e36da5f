"""The geometric-verification baseline the R²Former paper compares against.

Two images' local tokens are matched by mutual nearest neighbours of their 128-d features; a
homography is fitted to the matched token positions (x, y) with OpenCV's robust estimator
(MAGSAC++ by default, classic RANSAC as an option), and a candidate's score is its inlier count.
Works on the same (T, 131) token layout as the learned reranker, for every backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

METHODS = {"magsac": cv2.USAC_MAGSAC, "ransac": cv2.RANSAC}


@dataclass(frozen=True)
class RansacConfig:
    method: str = "magsac"
    # Token positions are normalised by max(H, W); this turns them back into pixels so the
    # reprojection threshold reads in pixels. One token cell is 16 px.
    image_scale: float = 640.0
    reprojection_threshold: float = 24.0  # pixels: 1.5 token cells
    max_iterations: int = 2000
    confidence: float = 0.999
    min_matches: int = 4


def mutual_nearest_neighbours(q_feat: np.ndarray, c_feat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(iq, ic)`` of token pairs that are each other's nearest neighbour by cosine
    similarity of their features."""
    if len(q_feat) == 0 or len(c_feat) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q = q_feat / np.maximum(np.linalg.norm(q_feat, axis=1, keepdims=True), 1e-12)
    c = c_feat / np.maximum(np.linalg.norm(c_feat, axis=1, keepdims=True), 1e-12)
    sim = q @ c.T
    best_c = sim.argmax(axis=1)
    best_q = sim.argmax(axis=0)
    iq = np.nonzero(best_q[best_c] == np.arange(len(q)))[0]
    return iq, best_c[iq]


def _valid(tokens: np.ndarray) -> np.ndarray:
    """Padding rows (all zero, as a store writes for images with fewer than T tokens) never match."""
    return np.any(tokens != 0, axis=1)


def match_tokens(q_tokens: np.ndarray, c_tokens: np.ndarray, config: RansacConfig = RansacConfig()):
    """Verify one pair. Returns ``(inliers, q_xy, c_xy, inlier_mask)`` with the mutual-NN matches'
    positions in normalised units (the layout's x, y) and which of them the homography kept."""
    q_tokens = np.asarray(q_tokens, np.float32)
    c_tokens = np.asarray(c_tokens, np.float32)
    qv, cv = np.nonzero(_valid(q_tokens))[0], np.nonzero(_valid(c_tokens))[0]
    iq, ic = mutual_nearest_neighbours(q_tokens[qv, 3:], c_tokens[cv, 3:])
    iq, ic = qv[iq], cv[ic]
    q_xy = q_tokens[iq, :2]
    c_xy = c_tokens[ic, :2]
    mask = np.zeros(len(iq), bool)
    if len(iq) < max(4, config.min_matches):
        return 0, q_xy, c_xy, mask
    try:
        method = METHODS[config.method]
    except KeyError:
        raise ValueError(f"unknown RANSAC method {config.method!r}; choose one of {sorted(METHODS)}") from None
    src = (q_xy * config.image_scale).astype(np.float64)
    dst = (c_xy * config.image_scale).astype(np.float64)
    try:
        h, m = cv2.findHomography(src, dst, method, config.reprojection_threshold,
                                  maxIters=config.max_iterations, confidence=config.confidence)
    except cv2.error:
        # Degenerate configurations (e.g. all matches on one line) have no homography.
        return 0, q_xy, c_xy, mask
    if h is None or m is None:
        return 0, q_xy, c_xy, mask
    mask = m.ravel().astype(bool)
    return int(mask.sum()), q_xy, c_xy, mask


def ransac_scores(q_tokens: np.ndarray, c_tokens: np.ndarray, config: RansacConfig = RansacConfig()) -> np.ndarray:
    """Inlier counts (P,) float32 for P (query, candidate) pairs of (P, T, 131) tokens."""
    if len(q_tokens) != len(c_tokens):
        raise ValueError(f"query and candidate token batches differ in length: {len(q_tokens)} vs {len(c_tokens)}")
    return np.array([match_tokens(q, c, config)[0] for q, c in zip(q_tokens, c_tokens)], np.float32)
