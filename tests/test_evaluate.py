"""Recall@N as the VG benchmark counts it, on hand-made cases."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluate import (candidate_sweep, correct_matrix, evaluate_results, format_sweep, has_positive,
                               recall_at)
from pipeline.rerank import RESULTS_SCHEMA


def test_recall_at_counts_first_n_and_excludes_queries_without_positive():
    correct = np.array([
        [True, False, False],   # right at 1
        [False, False, True],   # right at 3
        [False, False, False],  # never right
        [False, True, False],   # no positive in the database: excluded even though "right"
    ])
    r = recall_at(correct, has_positive=np.array([True, True, True, False]), ns=(1, 2, 3, 100))
    assert r == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(1 / 3),
                 "recall@3": pytest.approx(2 / 3), "recall@100": pytest.approx(2 / 3)}  # N > K: over the K
    assert recall_at(correct[:0], ns=(1,)) == {"recall@1": None}
    with pytest.raises(ValueError, match="N >= 1"):
        recall_at(correct, ns=(0,))


def test_has_positive_at_utm_scale():
    db = np.array([[584000.0, 4477000.0], [584100.0, 4477000.0], [np.nan, np.nan]])
    q = np.array([[584024.9, 4477000.0], [584050.0, 4477000.0], [584100.0, 4477025.0], [np.nan, 1.0]])
    assert has_positive(q, db, 25.0).tolist() == [True, False, True, False]


def _results(rows):
    cols = {name: [r[i] for r in rows] for i, name in enumerate(
        ["query_id", "rank", "global_rank", "query_utm_east", "candidate_utm_east", "rerank_score"])}
    n = len(rows)
    return pa.table({
        "query_id": cols["query_id"], "query_path": ["q"] * n, "rank": cols["rank"],
        "global_rank": cols["global_rank"], "image_id": list(range(n)), "candidate_path": ["c"] * n,
        "global_score": [0.0] * n, "rerank_score": cols["rerank_score"],
        "query_utm_east": cols["query_utm_east"], "query_utm_north": [None] * n,
        "candidate_utm_east": cols["candidate_utm_east"], "candidate_utm_north": [None] * n,
    }, schema=RESULTS_SCHEMA)


def test_evaluate_results_global_vs_reranked_and_sweep():
    # Query 1 at frame 10: global order puts a wrong frame first, reranking fixes it.
    # Query 2 at frame 50: right only at global rank 3 (reranking score puts it first).
    # Query 3 at frame 500: nothing in the database near it -> excluded.
    rows = [
        (1, 2, 1, 10, 30, 0.1), (1, 1, 2, 10, 11, 0.9), (1, 3, 3, 10, 70, 0.0),
        (2, 2, 1, 50, 90, 0.5), (2, 3, 2, 50, 95, 0.4), (2, 1, 3, 50, 51, 0.8),
        (3, 1, 1, 500, 30, 0.3), (3, 2, 2, 500, 11, 0.2), (3, 3, 3, 500, 70, 0.1),
    ]
    res = _results(rows)
    db = np.array([[11, 0], [30, 0], [51, 0], [70, 0], [90, 0], [95, 0]], float)
    m = evaluate_results(res, db, radius=2, ns=(1, 2, 3))
    assert m["num_queries"] == 3 and m["num_queries_without_positive"] == 1
    assert m["global"] == {"recall@1": 0.0, "recall@2": 0.5, "recall@3": 1.0}
    assert m["reranked"] == {"recall@1": 1.0, "recall@2": 1.0, "recall@3": 1.0}
    sweep = candidate_sweep(res, db, 2, [1, 2, 3, 5], ns=(1,))
    # K=1: only the global top-1 reranked -> the global R@1; K=2: query 1 fixed; K=3: both.
    assert [r["recall@1"] for r in sweep] == [0.0, 0.5, 1.0, 1.0]
    assert sweep[-1]["reranked_from"] == 3
    text = format_sweep(sweep)
    assert "5(3)" in text and "100.0" in text


def test_correct_matrix_unknown_positions_never_right():
    q = np.array([[0.0, 0.0]])
    c = np.array([[[1.0, 0.0], [np.nan, np.nan], [3.0, 0.0]]])
    assert correct_matrix(q, c, 2).tolist() == [[True, False, False]]


def test_evaluate_reads_a_results_folder_part_by_part_or_a_legacy_file(tmp_path):
    """`r2f evaluate --results` accepts the streaming job's folder (parts + manifest) and a legacy
    single file, with the same metrics; the folder is read one part at a time."""
    from helpers_store import write_tiny_store
    from pipeline import evaluate, storage
    from pipeline.rerank import results as R

    rows = [
        (1, 2, 1, 10, 30, 0.1), (1, 1, 2, 10, 11, 0.9), (1, 3, 3, 10, 70, 0.0),
        (2, 2, 1, 50, 90, 0.5), (2, 3, 2, 50, 95, 0.4), (2, 1, 3, 50, 51, 0.8),
        (3, 1, 1, 500, 30, 0.3), (3, 2, 2, 500, 11, 0.2), (3, 3, 3, 500, 70, 0.1),
    ]
    table = _results(rows)
    store = str(tmp_path / "db")
    write_tiny_store(store, [np.random.default_rng(0).random((100, 8), np.float32)])  # utm_east 0..99
    legacy = str(tmp_path / "results.parquet")
    storage.write_parquet(legacy, table, {"database_store": store})
    folder = str(tmp_path / "results")
    for p, (lo, hi) in enumerate([(0, 6), (6, 9)]):  # two parts of whole queries
        R.write_part(folder, p, table.slice(lo, hi - lo), {"queries": 1})
    state = {"store": store, "index_dir": None, "index_version": None, "store_generation": None}
    storage.write_json(R.ResultsLayout(folder).manifest, {"parts": [0, 1], "state": state, "database_store": store})
    a = evaluate.run(evaluate.EvaluateConfig(results=legacy, positive_radius=2, recall_ns=[1, 3]))
    b = evaluate.run(evaluate.EvaluateConfig(results=folder, positive_radius=2, recall_ns=[1, 3],
                                             sweep_candidates=[1, 2]))
    assert a.metrics == b.metrics and b.metrics["num_queries"] == 3
    assert b.metrics["num_queries_without_positive"] == 1 and b.metrics["reranked"]["recall@1"] == 1.0
    assert len(b.sweep) == 2
    seen = []

    def parts():
        for t in R.iter_parts(folder):
            seen.append(t.num_rows)
            yield t
    m, _ = evaluate.evaluate_parts(parts(), np.array([[float(i), 0.0] for i in range(100)]), 2, (1, 3))
    assert seen == [6, 3] and m == b.metrics
