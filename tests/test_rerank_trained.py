"""A hand-built candidate list that a reranker must fix: seven images of other places in global
order, then a homography-warped copy of the query at the last global rank. RANSAC and a reranking
transformer trained in this test must both move the copy to rank 1, the trained one by a clear
margin (an untrained reranker gives every pair nearly the same score)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.ransac import RansacConfig, ransac_scores
from pipeline.rerank import reranked_order

SIZE = (128, 224)                       # H, W: T = 8 x 14 = 112 tokens per image
TRAIN = range(0, 200, 8)                # 25 day_left places the reranker is trained on
QUERY = 150                             # never trained on (150 is not a multiple of 8)
OTHERS = (44, 68, 92, 116, 172, 188, 196)


def _rgb(root, traverse: str, i: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(root / traverse / f"Image{i:03d}.jpg")), cv2.COLOR_BGR2RGB)


def _warp(img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A perspective change plus a shift, as a second viewpoint of the same place would give;
    a fixed one without ``rng``, a random one of the same size with it."""
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    if rng is None:
        frac = np.float32([[0.04, 0.02], [0.97, 0.05], [0.93, 0.97], [0.02, 0.94]])
    else:
        frac = np.clip(np.float32([[0, 0], [1, 0], [1, 1], [0, 1]]) + rng.uniform(-0.06, 0.06, (4, 2)), 0, 1)
    dst = (frac * np.float32([w, h])).astype(np.float32)
    return cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT)


def _tokens(model, images: list[np.ndarray]) -> torch.Tensor:
    from pipeline.model import normalize_images
    x = torch.from_numpy(np.stack([cv2.resize(im, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_AREA)
                                   for im in images]))
    with torch.inference_mode():
        return model.extract(normalize_images(x)).local_tokens.float().clone()


@pytest.fixture(scope="module")
def candidates(gardens_point):
    """Tokens (EfficientNet-Lite0, ImageNet weights) of the query and its 8 candidates in global
    order; the warped copy of the query is last."""
    import os

    from pipeline.model import build_model
    torch.manual_seed(int(os.environ.get("R2F_TEST_SEED", "0")))  # the reranker's initial weights
    model = build_model("efficientnet-lite0")
    query = _rgb(gardens_point, "day_right", QUERY)
    images = [query, *[_rgb(gardens_point, "day_left", i) for i in OTHERS], _warp(query)]
    return model, _tokens(model, images)


def test_ransac_puts_the_warped_copy_first(candidates):
    _, t = candidates
    n = t.shape[0] - 1
    e = t.numpy()
    scores = ransac_scores(np.repeat(e[:1], n, axis=0), e[1:], RansacConfig(image_scale=float(max(SIZE))))
    order = reranked_order(scores, np.arange(1, n + 1))
    assert order[0] == n - 1, scores


def test_trained_reranker_puts_the_warped_copy_first(candidates, gardens_point):
    """Train the reranker (backbone frozen, as the rerank stage does) on other places: positives
    are random homographies of a day_left image and its day_right twin, negatives other places;
    then score the hand-built list."""
    model, t = candidates
    n = t.shape[0] - 1
    untrained = torch.softmax(model.rerank_logits(t[:1].expand(n, -1, -1).contiguous(), t[1:]), 1)[:, 1].numpy()

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    left = [_rgb(gardens_point, "day_left", i) for i in TRAIN]
    right = [_rgb(gardens_point, "day_right", i) for i in TRAIN]
    anchor = _tokens(model, left)
    views = torch.cat([_tokens(model, [_warp(im, rng) for im in left]), _tokens(model, right)])
    reranker = model.reranker
    reranker.train()
    opt = torch.optim.AdamW(reranker.parameters(), lr=1e-3, weight_decay=0.01)
    p = len(TRAIN)
    losses = []
    for _step in range(80):
        a = torch.from_numpy(rng.integers(0, p, 8))
        pos = views[a + p * torch.from_numpy(rng.integers(0, 2, 8))]
        neg_place = (a + torch.from_numpy(rng.integers(1, p, 8))) % p
        neg = views[neg_place + p * torch.from_numpy(rng.integers(0, 2, 8))]
        q = torch.cat([anchor[a], anchor[a]])
        c = torch.cat([pos, neg])
        target = torch.cat([torch.ones(8), torch.zeros(8)]).long()
        loss = torch.nn.functional.cross_entropy(reranker(q, c), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    reranker.eval()
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses

    logits = model.rerank_logits(t[:1].expand(n, -1, -1).contiguous(), t[1:])
    trained = torch.softmax(logits, dim=1)[:, 1].numpy()
    print(f"\nmatch probability, untrained {np.round(untrained, 3)}, trained {np.round(trained, 3)}")
    order = reranked_order(trained, np.arange(1, n + 1))
    assert order[0] == n - 1, (trained, untrained)
    assert trained[-1] - trained[:-1].max() > 0.3, (trained, untrained)
