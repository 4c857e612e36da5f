"""Reranking: RANSAC geometry on real tokens; the streaming job on a synthetic city (bench/city.py):
permutations, whole-chunk token reads, resume, plan refusal, a recorded failing partition,
and the model placement that keeps input and model on one device."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import storage
from pipeline.ransac import RansacConfig, match_tokens, mutual_nearest_neighbours, ransac_scores
from pipeline.rerank.stage import score_partition_size

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.city import write_city  # noqa: E402

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


# ---------------------------------------------------------------- the streaming job on a small city
DB_ROWS, QUERIES, PART = 1600, 96, 16  # 6 search partitions of 16 queries
# score and commit partitions follow the 2 scorer slots of the session's Ray (stage.PARTITIONS_PER_SLOT each)
PARTS = QUERIES // score_partition_size(QUERIES, PART, 2)


@pytest.fixture(scope="module")
def city(tmp_path_factory, ray_session):
    from pipeline import index
    root = tmp_path_factory.mktemp("city")
    db, q = str(root / "db"), str(root / "q")
    write_city(db, DB_ROWS, tokens=16, part_rows=160)
    write_city(q, QUERIES, tokens=16, part_rows=PART, queries_of=DB_ROWS, strip_positions=False)
    index.build(index.IndexConfig(store=db, index_dir=str(root / "index")))
    return root


def _cfg(city, results, **kw):
    from pipeline.rerank import RerankConfig
    base = dict(query_store=str(city / "q"), database_store=str(city / "db"), index_dir=str(city / "index"),
                results=str(results), backbone="efficientnet-lite0", reranker="ransac", candidates=10,
                partition_queries=PART, batch_pairs=37, num_actors=2, image_size=[160, 288])
    base.update(kw)
    return RerankConfig(**base)


def _check_permutations(results):
    df = results.to_pandas()
    changed = 0
    for _qid, sub in df.groupby("query_id"):
        assert sorted(sub["rank"]) == list(range(1, len(sub) + 1))
        assert sorted(sub["global_rank"]) == list(range(1, len(sub) + 1))
        assert sub["image_id"].is_unique
        by_rank = sub.sort_values("rank")
        assert (np.diff(by_rank["rerank_score"].to_numpy()) <= 0).all()
        changed += int(not (by_rank["global_rank"].to_numpy() == np.arange(1, len(sub) + 1)).all())
    return changed


@pytest.fixture(scope="module")
def ransac_run(city):
    from pipeline.rerank import read_results, run
    res = run(_cfg(city, city / "res_ransac"))
    return res, read_results(res.results)


def test_job_writes_one_part_per_partition_and_reorders(city, ransac_run):
    res, table = ransac_run
    assert res.partitions == PARTS and res.failed_partitions == []
    assert res.num_queries == QUERIES and res.num_pairs == QUERIES * 10 == table.num_rows
    folder = Path(res.results)
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == [f"part-{i:05d}.parquet" for i in range(PARTS)]
    assert len(list((folder / "progress").glob("*.json"))) == PARTS
    manifest = storage.read_json(str(folder / "manifest.json"))
    assert manifest["parts"] == list(range(PARTS)) and manifest["complete"]
    assert manifest["state"] == {"store": str(city / "db"), "index_dir": str(city / "index"),
                                 "index_version": "v0001", "store_generation": None}
    assert _check_permutations(table) >= 1
    # One row per (query, candidate); every query's list is its global top-10.
    assert not table.to_pandas().duplicated(["query_id", "image_id"]).any()
    # Token locality: chunks fetched once per partition at most; the job reports both figures.
    assert res.fetched_token_bytes >= res.distinct_candidate_bytes > 0
    # Strays (candidates outside their query's partition) were scored by the partition owning
    # their rows, with their own query's tokens: every score equals scoring the pair directly.
    # Their query's tokens travel once per (owner partition, query), not once per stray pair.
    strays = pa.concat_tables([pq.read_table(f) for f in sorted((Path(res.results) / "strays").glob("*.parquet"))])
    assert strays.num_rows == res.stray_pairs > 0
    copies = len(set(zip(strays.column("owner").to_pylist(), strays.column("query_id").to_pylist())))
    assert copies < res.stray_pairs and strays.column("query_tokens").null_count == res.stray_pairs - copies
    assert res.stray_query_token_bytes == copies * 16 * 131 * 2
    df = table.to_pandas()
    qrow = dict(zip(*(storage.read_global_table(str(city / "q"), ["image_id", "row"]).column(c).to_numpy()
                      for c in ("image_id", "row"))))
    drow = dict(zip(*(storage.read_global_table(str(city / "db"), ["image_id", "row"]).column(c).to_numpy()
                      for c in ("image_id", "row"))))
    q = storage.read_local_tokens(str(city / "q"), np.array([qrow[i] for i in df["query_id"]]))
    c = storage.read_local_tokens(str(city / "db"), np.array([drow[i] for i in df["image_id"]]))
    # token positions are in the store's extraction pixels: the job scales RANSAC by the store's size
    scale = float(max(storage.extraction_size(storage.read_manifest(str(city / "db")))))
    direct = ransac_scores(q.astype(np.float32), c.astype(np.float32), RansacConfig(image_scale=scale))
    assert np.array_equal(direct.astype(np.float32), df["rerank_score"].to_numpy())


def test_rerun_skips_committed_partitions_and_rewrites_a_lost_one(city, ransac_run, tmp_path):
    import shutil

    from pipeline.rerank import read_results, run
    res, table = ransac_run
    copy = tmp_path / "res"
    shutil.copytree(res.results, copy)
    (copy / "manifest.json").unlink()
    (copy / "progress" / "part-00003.json").unlink()   # partition 3 never committed
    (copy / "part-00003.parquet").write_bytes(b"half a file")
    again = run(_cfg(city, copy))
    assert again.skipped_partitions == PARTS - 1 and again.num_pairs == res.num_pairs
    assert again.skipped_score_partitions == PARTS and again.fetched_token_bytes == 0  # its scores were kept
    assert read_results(str(copy)).equals(table)  # same rows, same order

    # Score partition 3 lost too (and its part): it is scored again, alone, bit-equal.
    (copy / "manifest.json").unlink()
    (copy / "progress" / "part-00003.json").unlink()
    (copy / "scores" / "progress" / "score-00003.json").unlink()
    (copy / "scores" / "score-00003.parquet").write_bytes(b"half a file")
    again = run(_cfg(city, copy))
    assert again.skipped_partitions == PARTS - 1 and again.skipped_score_partitions == PARTS - 1
    assert again.fetched_token_bytes > 0
    assert read_results(str(copy)).equals(table)  # bit-equal scores, same rows, same order


def test_changed_inputs_refuse_to_mix(city, ransac_run):
    from pipeline.rerank import run
    from pipeline.rerank.partitions import PlanMismatch
    res, _ = ransac_run
    with pytest.raises(PlanMismatch, match=r"candidates: 10 -> 5"):
        run(_cfg(city, res.results, candidates=5))
    with pytest.raises(PlanMismatch, match=r"reranker: 'ransac' -> 'none'"):
        run(_cfg(city, res.results, reranker="none"))


def test_failing_partition_is_recorded_and_the_job_goes_on(city, tmp_path):
    import shutil

    import pyarrow as pa

    from pipeline.rerank import read_results, run
    q = tmp_path / "q"
    shutil.copytree(city / "q", q)
    part = storage.StoreLayout(str(q)).global_part(2)  # query shard 2 = search partition 2: wrong descriptor width
    t = storage.read_parquet(part)
    bad = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(t.num_rows * 8, np.float32)), 8)
    t = t.drop_columns(["global_descriptor"]).append_column("global_descriptor", bad)
    storage.write_parquet(part, t)
    res = run(_cfg(city, tmp_path / "res", query_store=str(q), reranker="none"))
    assert res.failed_search_partitions == [2] and res.failed_partitions == [] and not res.ok
    assert res.num_failed_queries == PART
    failure = storage.read_json(str(tmp_path / "res" / "routes" / "failures" / "search-00002.json"))
    assert failure["query_ids"] == t.column("image_id").to_pylist() and "queries must be" in failure["reason"]
    assert read_results(str(tmp_path / "res")).num_rows == (QUERIES - PART) * 10
    manifest = storage.read_json(str(tmp_path / "res" / "manifest.json"))
    assert manifest["failed_search_partitions"] == [2] and not manifest["complete"]


def test_chunk_cache_reads_whole_chunks_once(city):
    from pipeline.rerank.tokens import ChunkCache
    cache = ChunkCache(str(city / "db"), cache_chunks=4)
    rows = np.array([3, 17, 5, 18, 3, 40])  # chunks 0, 1, 2 of 16 rows
    got = cache.read(rows)
    assert cache.fetched_chunks == 3 and cache.fetched_bytes == 3 * 16 * cache.row_bytes
    assert np.array_equal(got, storage.read_local_tokens(str(city / "db"), rows))
    cache.read(np.array([1, 2, 33]))  # all cached
    assert cache.fetched_chunks == 3


def test_locality_order_and_schedule():
    from pipeline.rerank.workers import locality_order, pair_schedule
    assert locality_order(np.array([50, -1, 3, 50, 20])).tolist() == [2, 4, 0, 3, 1]
    sched = pair_schedule(np.array([1, 0, 1, 0]), np.array([40, 41, 2, 3]), 16)
    assert sched.tolist() == [3, 2, 1, 0]  # chunk 0 first (query 0, then 1), then chunk 2


def test_pair_scorer_places_the_model_where_it_sends_inputs(city, monkeypatch):
    """The scorer sends inputs to the device of the model's parameters, and the model is placed
    through pipeline.device (its own ``plan`` moves too): on ``meta`` every step must agree,
    otherwise ``rerank_logits`` meets tensors on two devices and raises."""
    from pipeline import device
    from pipeline.rerank import PairScorer
    meta = device.DevicePlan(torch.device("meta"), None)
    monkeypatch.setattr(device, "choose_device", lambda prefer="auto": meta)
    called = []
    real = device.place_model
    monkeypatch.setattr(device, "place_model", lambda m, plan: called.append(plan) or real(m, plan))
    scorer = PairScorer("r2former", "efficientnet-lite0", None, str(city / "q"), str(city / "db"), RansacConfig())
    assert called == [meta]
    assert {p.device.type for p in scorer.model.parameters()} == {"meta"}
    assert scorer.input_device.type == "meta" and scorer.model.plan.device.type == "meta"
    q = torch.zeros(2, 16, 131, device="meta")
    assert scorer.model.rerank_logits(q, q).shape == (2, 2)


def test_bfloat16_is_opt_in(city):
    from pipeline.rerank import PairScorer, RerankConfig
    assert RerankConfig().rerank_dtype == "float32"
    with pytest.raises(ValueError, match="rerank_dtype"):
        PairScorer("ransac", "efficientnet-lite0", None, str(city / "q"), str(city / "db"), RansacConfig(),
                   rerank_dtype="float16")


def test_two_rerankers_over_one_search_equal_each_alone(city, ransac_run, tmp_path):
    """One job with ``ransac,r2former``: each reranker's ranked lists and scores equal a run with
    that reranker alone, over one top-K search (one route part per search partition, searched once)."""
    import torch

    from pipeline.model import build_model
    from pipeline.rerank import read_results, run
    torch.manual_seed(0)
    model = build_model("efficientnet-lite0")
    model.has_trained_reranker = True  # weights stand in for trained ones: equality is what is tested
    ckpt_path = model.save_checkpoint(tmp_path / "reranker.pt")
    both = run(_cfg(city, tmp_path / "both", reranker="ransac,r2former", checkpoint=str(ckpt_path)))
    alone = run(_cfg(city, tmp_path / "r2former", reranker="r2former", checkpoint=str(ckpt_path)))
    assert both.rerankers == ["ransac", "r2former"] and both.reranker == "ransac"
    assert set(both.rerank_seconds) == {"ransac", "r2former"} and all(v > 0 for v in both.rerank_seconds.values())
    # one top-K search: every search partition routed once, by one attempt
    routes = tmp_path / "both" / "routes"
    searches = sorted(routes.glob("search-*.parquet"))
    assert len(searches) == QUERIES // PART == len(list((routes / "progress").glob("*.json")))
    assert all(json.loads(f.read_text())["attempts"] == 1 for f in (routes / "attempts").glob("*.json"))
    manifest = storage.read_json(str(tmp_path / "both" / "manifest.json"))
    assert manifest["rerankers"] == ["ransac", "r2former"] and set(manifest["rerank_seconds"]) == {"ransac", "r2former"}

    df = read_results(both.results).to_pandas()
    key = ["query_id", "image_id"]
    for name, single in (("ransac", ransac_run[1].to_pandas()), ("r2former", read_results(alone.results).to_pandas())):
        mine = df.sort_values(["query_id", f"rank_{name}"])[key + [f"rank_{name}", f"rerank_score_{name}"]]
        theirs = single.sort_values(["query_id", "rank"])[key + ["rank", "rerank_score"]]
        assert (mine[key].to_numpy() == theirs[key].to_numpy()).all(), name
        assert (mine[f"rerank_score_{name}"].to_numpy() == theirs["rerank_score"].to_numpy()).all(), name
    assert (df["rank"] == df["rank_ransac"]).all() and (df["rerank_score"] == df["rerank_score_ransac"]).all()


def test_task_workers_are_recycled_by_queries_handled():
    """Phases 2 and 4 replace a pooled worker after WORKER_QUERIES queries' partitions (its peak
    grew with the partitions it had run): two at the default partition size, never fewer."""
    from pipeline.rerank.phases import WORKER_QUERIES, tasks_per_worker
    assert tasks_per_worker(4096) == 2 and tasks_per_worker(WORKER_QUERIES * 4) == 2
    assert tasks_per_worker(16) == WORKER_QUERIES // 16 and tasks_per_worker(3000) == 3
