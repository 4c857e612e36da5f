"""Reranking on real tokens: RANSAC geometry, permutation of the candidates, one Zarr read per row."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.ransac import RansacConfig, match_tokens, mutual_nearest_neighbours, ransac_scores
from helpers_store import write_frame_manifest

SIZE = (160, 288)  # H, W: small so the test stays fast; T = 10 x 18 tokens


@pytest.fixture(scope="module")
def effnet():
    from pipeline.model import build_model
    return build_model("efficientnet-lite0")


def _tokens(model, images: list[np.ndarray]) -> np.ndarray:
    from pipeline.model import normalize_images
    x = torch.from_numpy(np.stack([cv2.resize(im, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_AREA)
                                   for im in images]))
    with torch.inference_mode():
        return model.extract(normalize_images(x)).local_tokens.float().numpy()


def test_mutual_nearest_neighbours_are_mutual():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 128)).astype(np.float32)
    perm = rng.permutation(50)
    b = a[perm] + 0.01 * rng.normal(size=(50, 128)).astype(np.float32)
    iq, ic = mutual_nearest_neighbours(a, b)
    assert len(iq) == 50 and np.array_equal(perm[ic], iq)


def test_ransac_prefers_a_warped_copy_over_an_unrelated_image(effnet, gardens_point):
    img = cv2.cvtColor(cv2.imread(str(gardens_point / "day_right" / "Image040.jpg")), cv2.COLOR_BGR2RGB)
    other = cv2.cvtColor(cv2.imread(str(gardens_point / "day_right" / "Image160.jpg")), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    # A mild perspective change plus a shift, as a second viewpoint of the same place would give.
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[0.04 * w, 0.02 * h], [0.97 * w, 0.05 * h], [0.93 * w, 0.97 * h], [0.02 * w, 0.94 * h]])
    warped = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT)
    t = _tokens(effnet, [img, warped, other])
    cfg = RansacConfig(image_scale=float(max(SIZE)))
    scores = ransac_scores(t[[0, 0]], t[[1, 2]], cfg)
    assert scores[0] > scores[1], scores
    assert scores[0] >= 20, scores
    inliers, q_xy, c_xy, mask = match_tokens(t[0], t[1], cfg)
    assert inliers == int(scores[0]) and mask.sum() == inliers and len(q_xy) == len(mask)
    # Degenerate input: too few tokens to fit a homography scores 0, never raises.
    assert ransac_scores(t[:1, :3], t[1:2, :3], cfg)[0] == 0




@pytest.fixture(scope="module")
def small_run(tmp_path_factory, gardens_point, ray_session):
    from pipeline.run import RunConfig, run
    tmp = tmp_path_factory.mktemp("rerank")
    db = write_frame_manifest(tmp / "db.csv", gardens_point / "day_right", range(0, 200, 10))      # 20 places
    q = write_frame_manifest(tmp / "q.csv", gardens_point / "night_right", range(5, 200, 25))      # 8 queries
    cfg = RunConfig(database=db, queries=q, out=str(tmp / "out"), backbone="efficientnet-lite0",
                    reranker="ransac", candidates=8, positive_radius=6, image_size=list(SIZE), batch_pairs=24)
    res = run(cfg)
    return cfg, res


def _check_permutations(results):
    df = results.to_pandas()
    changed = 0
    for qid, sub in df.groupby("query_id"):
        ranks = sorted(sub["rank"]) == list(range(1, len(sub) + 1))
        granks = sorted(sub["global_rank"]) == list(range(1, len(sub) + 1))
        assert ranks and granks, sub
        assert sub["image_id"].is_unique
        by_rank = sub.sort_values("rank")
        assert (np.diff(by_rank["rerank_score"].to_numpy()) <= 0).all()
        changed += int(not (by_rank["global_rank"].to_numpy() == np.arange(1, len(sub) + 1)).all())
    return changed


@pytest.mark.parametrize("reranker", ["ransac", "r2former", "none"])
def test_reranked_lists_are_permutations_of_the_candidates(small_run, reranker, tmp_path):
    from pipeline.rerank import RerankConfig, run
    cfg, _ = small_run
    out = cfg.out
    res = run(RerankConfig(query_store=f"{out}/query_store", database_store=f"{out}/database_store",
                           index_dir=f"{out}/index", results=str(tmp_path / "r.parquet"),
                           backbone="efficientnet-lite0", image_size=list(SIZE), reranker=reranker,
                           candidates=8, batch_pairs=24))
    assert res.reranker == reranker and res.num_queries == 8 and res.num_pairs == 8 * 8
    results = storage.read_parquet(res.results)
    assert results.num_rows == 64
    changed = _check_permutations(results)
    if reranker == "none":
        assert changed == 0
    else:
        assert changed >= 1, f"{reranker} never changed an order"
    # The candidate set is exactly the global top-K, whichever reranker ran.
    base = storage.read_parquet(f"{out}/results.parquet").to_pandas()
    mine = results.to_pandas()
    for qid in base["query_id"].unique():
        assert set(base[base.query_id == qid].image_id) == set(mine[mine.query_id == qid].image_id)


def test_candidates_capped_at_database_size(small_run, tmp_path):
    from pipeline.rerank import RerankConfig, run
    cfg, _ = small_run
    out = cfg.out
    res = run(RerankConfig(query_store=f"{out}/query_store", database_store=f"{out}/database_store",
                           index_dir=f"{out}/index", results=str(tmp_path / "r.parquet"),
                           backbone="efficientnet-lite0", image_size=list(SIZE), reranker="none", candidates=500))
    assert res.candidates == 20 and res.num_pairs == 8 * 20


class _CountingArray:
    """Wraps a Zarr array and records which rows each read asked for."""

    def __init__(self, arr):
        self.arr, self.reads = arr, []
        self.shape = arr.shape

    def get_orthogonal_selection(self, sel):
        self.reads.append(np.asarray(sel[0]).tolist())
        return self.arr.get_orthogonal_selection(sel)


def test_batch_reads_each_candidate_row_once(small_run):
    from pipeline.rerank import PairScorer
    cfg, _ = small_run
    out = cfg.out
    scorer = PairScorer("ransac", "efficientnet-lite0", None, f"{out}/query_store", f"{out}/database_store",
                        RansacConfig(image_scale=float(max(SIZE))))
    scorer.c_tokens = _CountingArray(scorer.c_tokens)
    scorer.q_tokens = _CountingArray(scorer.q_tokens)
    # 4 queries sharing the same 5 candidates: 20 pairs, one read of 5 candidate rows, 4 query rows.
    q_rows = np.repeat(np.arange(4), 5)
    c_rows = np.tile(np.array([3, 7, 1, 9, 4]), 4)
    res = scorer({"pair": np.arange(20), "query_row": q_rows, "candidate_row": c_rows})
    assert len(res["rerank_score"]) == 20
    assert scorer.c_tokens.reads == [[1, 3, 4, 7, 9]] and scorer.q_tokens.reads == [[0, 1, 2, 3]]
