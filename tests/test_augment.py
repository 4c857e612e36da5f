"""pipeline.augment: the token-position homography of the rerank stage's training pairs."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.augment import augment_candidates, random_homographies, warp_token_positions
from pipeline.train import ConfigError, TrainConfig, validate


def tokens(rng, b=3, t=6):
    tok = rng.normal(size=(b, t, 131)).astype(np.float32)
    tok[:, :, :2] = rng.uniform(0, 1, size=(b, t, 2))
    tok[:, -2:] = 0  # padding rows
    return tok


def test_identity_and_known_homography():
    rng = np.random.default_rng(0)
    tok = tokens(rng)
    same = warp_token_positions(tok, random_homographies(rng, len(tok), 0.0))
    np.testing.assert_allclose(same, tok, atol=1e-6)
    shift = np.tile(np.array([[1, 0, 0.1], [0, 1, -0.2], [0, 0, 1]], float), (len(tok), 1, 1))
    out = warp_token_positions(tok, shift)
    np.testing.assert_allclose(out[:, :-2, 0], tok[:, :-2, 0] + 0.1, atol=1e-6)
    np.testing.assert_allclose(out[:, :-2, 1], tok[:, :-2, 1] - 0.2, atol=1e-6)
    np.testing.assert_array_equal(out[:, :, 2:], tok[:, :, 2:])  # features untouched
    np.testing.assert_array_equal(out[:, -2:], 0)                # padding stays padding
    np.testing.assert_array_equal(tok[:, -2:], 0)                # input not modified


def test_random_homographies_move_corners_within_scale():
    rng = np.random.default_rng(1)
    hs = random_homographies(rng, 20, 0.05, 1.0, 0.5)
    corners = np.array([[0, 0, 1], [1, 0, 1], [1, 0.5, 1], [0, 0.5, 1]], float)
    p = np.einsum("bij,kj->bki", hs, corners)
    moved = p[:, :, :2] / p[:, :, 2:] - corners[None, :, :2]
    assert np.abs(moved).max() <= 0.05 + 1e-9 and np.abs(moved).max() > 0.01


def test_augment_hook_and_config():
    rng = np.random.default_rng(2)
    tok = tokens(rng)
    assert augment_candidates(tok, "none", 0.1, rng) is tok
    out = augment_candidates(tok, "homography", 0.1, rng, aspect=272 / 480)
    assert out.shape == tok.shape and not np.allclose(out[:, :-2, :2], tok[:, :-2, :2])
    with pytest.raises(ValueError):
        augment_candidates(tok, "mixup", 0.1, rng)
    with pytest.raises(ConfigError, match="augment"):
        validate(TrainConfig(stage="rerank", init="random", augment="mixup"))
    with pytest.raises(ConfigError, match="stored tokens"):
        validate(TrainConfig(stage="retrieval", init="random", augment="homography"))
