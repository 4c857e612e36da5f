"""Recall@N as the VG benchmark counts it, on hand-made cases."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluate import candidate_sweep, correct_matrix, evaluate_results, format_sweep, has_positive
from pipeline.metrics import recall_at
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
    # one unnamed reranker, with its pairs (3 queries x 3 candidates)
    assert m["rerankers"] == {"reranked": {**m["reranked"], "pairs_scored": 9,
                                           "pairs_per_query": {"mean": 3.0, "p50": 3, "p99": 3}}}
    assert "by_tag" not in m
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
    # run() adds the radius it used and its unit; the recalls are evaluate_parts' own
    assert seen == [6, 3] and m == {k: v for k, v in b.metrics.items() if not k.startswith("positive_radius")}


# ---------------------------------------------------------------- several rerankers, tags, table 2
# Database frames (radius 2). Query 1 (night) at 10: global [30, 11, 70]; RANSAC fixes it, R2Former
# does not. Query 2 (day) at 50: global [90, 95, 51]; RANSAC puts 51 first, R2Former second.
# Query 3 (night) at 500: no positive. Query 4 (untagged) at 20: global [21, 60, 61]; RANSAC breaks it.
DB = np.array([[x, 0] for x in (11, 21, 30, 51, 60, 61, 70, 90, 95)], float)
QUERIES = [  # (query id, tag, position, candidates in global order, RANSAC scores, R2Former scores)
    (1, "night", 10, [30, 11, 70], [0.1, 0.9, 0.0], [0.8, 0.2, 0.1]),
    (2, "day", 50, [90, 95, 51], [0.5, 0.4, 0.8], [0.1, 0.9, 0.3]),
    (3, "night", 500, [30, 11, 70], [0.3, 0.2, 0.1], [0.3, 0.2, 0.1]),
    (4, None, 20, [21, 60, 61], [0.1, 0.9, 0.2], [0.9, 0.1, 0.2]),
]


def _two_reranker_results(queries=QUERIES):
    """A results part as the multi-reranker job writes it: ``rank`` / ``rerank_score`` are the
    first reranker's (ransac), ``rank_<n>`` / ``rerank_score_<n>`` every one's, ``query_tag``."""
    from pipeline.rerank.rerankers import reranked_order

    cols = {c: [] for c in [*RESULTS_SCHEMA.names, "query_tag", "rank_ransac", "rerank_score_ransac",
                            "rank_r2former", "rerank_score_r2former"]}
    for qid, tag, x, cands, ransac, r2f in queries:
        g = np.arange(1, len(cands) + 1)
        ranks = {}
        for name, score in (("ransac", ransac), ("r2former", r2f)):
            r = np.empty(len(cands), np.int32)
            r[reranked_order(np.array(score), g)] = np.arange(1, len(cands) + 1)
            ranks[name] = r
        for j, c in enumerate(cands):
            row = dict(query_id=qid, query_path="q", rank=ranks["ransac"][j], global_rank=g[j], image_id=c,
                       candidate_path="c", global_score=1.0 - j / 10, rerank_score=ransac[j],
                       query_utm_east=float(x), query_utm_north=0.0, candidate_utm_east=float(c),
                       candidate_utm_north=0.0, query_tag=tag, rank_ransac=ranks["ransac"][j],
                       rerank_score_ransac=ransac[j], rank_r2former=ranks["r2former"][j],
                       rerank_score_r2former=r2f[j])
            for k, v in row.items():
                cols[k].append(v)
    fields = list(RESULTS_SCHEMA) + [pa.field("query_tag", pa.string())]
    for n in ("ransac", "r2former"):
        fields += [pa.field(f"rank_{n}", pa.int32()), pa.field(f"rerank_score_{n}", pa.float32())]
    return pa.table(cols, schema=pa.schema(fields)).sort_by([("query_id", "ascending"), ("rank", "ascending")])


def test_each_reranker_and_each_tag_scored_from_its_own_columns():
    from pipeline.evaluate import evaluate_parts

    table = _two_reranker_results()
    # two parts of whole queries, read one at a time
    m, _ = evaluate_parts([table.slice(0, 6), table.slice(6)], DB, 2, ns=(1, 2, 3))
    assert m["num_queries"] == 4 and m["queries_without_positive"] == [3]
    assert list(m["rerankers"]) == ["ransac", "r2former"]  # column order: the run's order
    assert m["global"] == {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 1.0}
    pairs = {"pairs_scored": 12, "pairs_per_query": {"mean": 3.0, "p50": 3, "p99": 3}}  # 4 queries x 3
    assert m["rerankers"]["ransac"] == {"recall@1": 2 / 3, "recall@2": 2 / 3, "recall@3": 1.0, **pairs}
    assert m["rerankers"]["r2former"] == {"recall@1": 1 / 3, "recall@2": 1.0, "recall@3": 1.0, **pairs}
    assert m["reranked"] == {"recall@1": 2 / 3, "recall@2": 2 / 3, "recall@3": 1.0}  # the first listed
    assert list(m["by_tag"]) == ["day", "night"]  # the untagged query is in no group
    night, day = m["by_tag"]["night"], m["by_tag"]["day"]
    assert (night["num_queries"], night["num_queries_without_positive"]) == (2, 1)
    assert night["global"] == {"recall@1": 0.0, "recall@2": 1.0, "recall@3": 1.0}
    assert night["rerankers"] == {"ransac": {"recall@1": 1.0, "recall@2": 1.0, "recall@3": 1.0},
                                  "r2former": {"recall@1": 0.0, "recall@2": 1.0, "recall@3": 1.0}}
    assert (day["num_queries"], day["num_queries_without_positive"]) == (1, 0)
    assert day["global"] == {"recall@1": 0.0, "recall@2": 0.0, "recall@3": 1.0}
    assert day["rerankers"]["ransac"]["recall@1"] == 1.0 and day["rerankers"]["r2former"]["recall@2"] == 1.0
    # The order asked for wins over the columns' order; a reranker without columns is an error.
    m2, _ = evaluate_parts([table], DB, 2, ns=(1,), rerankers=["r2former", "ransac"])
    assert list(m2["rerankers"]) == ["r2former", "ransac"] and m2["reranked"] == {"recall@1": 1 / 3}
    with pytest.raises(KeyError, match="magsac"):
        evaluate_parts([table], DB, 2, ns=(1,), rerankers=["ransac", "magsac"])


def test_old_results_have_one_reranker_and_no_tags():
    """Results written before per-reranker columns: the one reranker is ``rank`` (named by the run
    when it recorded its reranker), and there is no by_tag."""
    from pipeline.evaluate import evaluate_parts

    old = _two_reranker_results().drop_columns(["query_tag", "rank_ransac", "rerank_score_ransac", "rank_r2former",
                                                "rerank_score_r2former"])
    m, rows = evaluate_parts([old], DB, 2, ns=(1, 2, 3), sweep=[2])
    assert list(m["rerankers"]) == ["reranked"] and "by_tag" not in m
    assert m["reranked"] == {"recall@1": 2 / 3, "recall@2": 2 / 3, "recall@3": 1.0}  # = ransac above
    assert [r["reranker"] for r in rows] == ["reranked"]
    named, _ = evaluate_parts([old], DB, 2, ns=(1,), rerankers=["ransac"])
    assert named["rerankers"] == {"ransac": {"recall@1": 2 / 3, "pairs_scored": 12,
                                             "pairs_per_query": {"mean": 3.0, "p50": 3, "p99": 3}}}


def test_sweep_table_has_one_block_per_reranker_with_ms_per_query():
    """Table 2's layout: a block per reranker, R@1/5/10 per K, rerank ms/query measured at the
    run's K (3 here) and scaled by K/3 below it."""
    table = _two_reranker_results()
    rows = candidate_sweep(table, DB, 2, [1, 2, 3, 5])
    assert [(r["reranker"], r["candidates"], r["reranked_from"]) for r in rows] == [
        ("ransac", 1, 1), ("ransac", 2, 2), ("ransac", 3, 3), ("ransac", 5, 3),
        ("r2former", 1, 1), ("r2former", 2, 2), ("r2former", 3, 3), ("r2former", 5, 3)]
    r1 = {(r["reranker"], r["candidates"]): r["recall@1"] for r in rows}
    assert r1[("ransac", 1)] == r1[("r2former", 1)] == 1 / 3   # top-1 "reranked" = global
    assert r1[("ransac", 2)] == 1 / 3 and r1[("ransac", 3)] == 2 / 3  # K = the run: its own R@1
    assert r1[("r2former", 2)] == 1 / 3 and r1[("r2former", 3)] == 1 / 3
    text = format_sweep(rows, {"ransac": 30.0, "r2former": 90.0})
    blocks = {}
    for line in text.splitlines():
        if line.startswith("reranker "):
            name = line.split()[1]
            blocks[name] = []
        elif line.strip()[:1].isdigit():
            blocks[name].append(line.split())
        elif line.strip().startswith("top-K"):
            assert line.split()[2:6] == ["R@1", "R@5", "R@10", "rerank"], line
    assert list(blocks) == ["ransac", "r2former"]
    assert [b[0] for b in blocks["ransac"]] == ["1", "2", "3", "5(3)"]
    assert blocks["ransac"][2] == ["3", "66.7", "100.0", "100.0", "30.0"]
    assert [b[-1] for b in blocks["ransac"]] == ["10.0", "20.0", "30.0", "30.0"]
    assert [b[-1] for b in blocks["r2former"]] == ["30.0", "60.0", "90.0", "90.0"]
    assert "K = 3" in text and "K/3" in text and "5(3)" in text
    assert "rerank ms/query" not in format_sweep(rows)  # nothing measured: no column


def test_evaluate_cli_prints_every_reranker_tags_and_table_2(tmp_path, capsys):
    """`r2f evaluate --results FOLDER --sweep-candidates ...` on a two-reranker result folder: the
    recalls of each reranker and tag, and the sweep's ms/query from the manifest's rerank_seconds."""
    from helpers_store import write_tiny_store

    from pipeline import evaluate, storage
    from pipeline.cli import build_parser
    from pipeline.rerank import results as R

    store = str(tmp_path / "db")
    write_tiny_store(store, [np.zeros((100, 8), np.float32)])  # utm_east 0..99
    folder = str(tmp_path / "results")
    table = _two_reranker_results()
    R.write_part(folder, 0, table.slice(0, 6), {"queries": 2})
    R.write_part(folder, 1, table.slice(6), {"queries": 2})
    storage.write_json(R.ResultsLayout(folder).manifest, {
        "parts": [0, 1], "database_store": store, "reranker": "ransac", "rerankers": ["ransac", "r2former"],
        "rerank_seconds": {"ransac": 0.2, "r2former": 0.8}, "num_queries": 4, "num_pairs": 12})
    res = evaluate.run(evaluate.EvaluateConfig(results=folder, positive_radius=2, recall_ns=[1, 5],
                                               sweep_candidates=[1, 3]))
    assert res.rerank_ms == {"ransac": 50.0, "r2former": 200.0}  # seconds / 4 queries
    assert res.metrics["rerankers"]["r2former"]["recall@1"] == pytest.approx(1 / 3)
    args = build_parser().parse_args(["evaluate", "--results", folder, "--positive-radius", "2",
                                      "--sweep-candidates", "1,3"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "tag night: 2 queries (1 without a positive)" in out and "tag day: 1 queries" in out
    assert "   ransac: R@1=66.7" in out and " r2former: R@1=33.3" in out
    lines = out.splitlines()
    r2 = lines.index("reranker r2former")
    assert lines[r2 + 2].split() == ["1", "33.3", "33.3", "33.3", "66.7"]  # 200 ms at K = 3, scaled to K = 1
    assert lines[r2 + 3].split() == ["3", "33.3", "100.0", "100.0", "200.0"]


def test_evaluate_refuses_datasets_and_names_r2f_run(tmp_path):
    """`r2f evaluate` scores finished runs only: datasets go to `r2f run`, which evaluates itself."""
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--database", "d", "--queries", "q", "--out", str(tmp_path / "o"),
                                      "--sweep-candidates", "20,200"])
    with pytest.raises(ValueError, match=r"r2f run --database D --queries Q --out OUT --candidates 200"):
        args.func(args)
    assert not (tmp_path / "o").exists()


def test_sweep_bound_stops_each_query_at_its_shortest_right_prefix_and_grid_has_gates():
    """The bound row: a query whose full top-K top-1 is right stops at the shortest prefix whose
    reranked top-1 is already that right one; a query wrong at K costs 1 pair; no rule beats it.
    The grid also tries global gates (a rule with ``gate``) where a rule has a second round."""
    from pipeline.evaluate import ScoredLists, format_adaptive_sweep, oracle_lengths, rule_grid, sweep_adaptive
    s = np.array([[9.0, 1, 2, 3, 4, 5],     # right at global rank 1, best from the start -> 1
                  [1.0, 2, 9, 3, 4, 5],     # right at rank 3, best once scored -> 3
                  [5.0, 1, 1, 9, 1, 1],     # right at rank 2, but rank 4 outscores it -> wrong at K -> 1
                  [3.0, 5, 1, 1, 1, 8]])    # right at rank 6 -> 6
    correct = np.zeros_like(s, bool)
    correct[0, 0] = correct[1, 2] = correct[2, 1] = correct[3, 5] = True
    g = np.tile(np.linspace(0.9, 0.4, 6), (4, 1)) + np.arange(4)[:, None] * 0.01
    lists = ScoredLists(scores={"ransac": s}, global_scores=g, correct=correct,
                        has_positive=np.ones(4, bool), query_ids=np.arange(4))
    assert oracle_lengths(lists, "ransac").tolist() == [1, 3, 1, 6]
    rows, _ = sweep_adaptive(lists, ["ransac"])
    bound = [r for r in rows if r["kind"] == "bound"]
    full = [r for r in rows if r["kind"] == "fixed" and r["candidates"] == 6]
    assert len(bound) == 1 and bound[0]["pairs_per_query"] == pytest.approx(11 / 4)
    assert bound[0]["recall@1"] == full[0]["recall@1"] == pytest.approx(0.75)
    assert not bound[0].get("chosen") and "bound: shortest right prefix" in format_adaptive_sweep(rows)
    assert all(r["pairs_per_query"] >= bound[0]["pairs_per_query"] for r in rows
               if r["kind"] == "rule" and r["recall@1"] >= full[0]["recall@1"])
    assert any(r.gate_margin is not None and len(r.rounds) > 1 for r in rule_grid(lists, "ransac"))
