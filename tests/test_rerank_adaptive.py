"""Adaptive candidate counts in the rerank job (pipeline/rerank/adaptive.py): a query whose first
round passes its reranker's stop rule gets no more pairs, one that fails it does; a job stopped
between rounds or in the middle of one resumes to the uninterrupted run's rows; the rule is part
of the plan; score partitions follow the scorer slots. On a synthetic city (bench/city.py) with
the ``token-similarity`` stand-in scorer, which reads the real tokens at little compute."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from pipeline.rerank.adaptive import AdaptiveRule, RuleError, prefix_lengths, rules_of

ROOT = Path(__file__).resolve().parents[1]
import sys  # noqa: E402

sys.path.insert(0, str(ROOT))
from bench.city import write_city  # noqa: E402

DB_ROWS, QUERIES, K = 800, 48, 10
SCORER = "token-similarity"


# ---------------------------------------------------------------- the rule, without Ray
def test_rule_checks_and_cascade():
    with pytest.raises(RuleError, match=r"\['r2former'\]"):
        rules_of({"ransac": {"rounds": [5], "stop": {"score": 1}}}, ["ransac", "r2former"])
    with pytest.raises(RuleError, match="none"):
        rules_of({"none": {"rounds": [5], "stop": {"score": 1}}}, ["none"])
    with pytest.raises(RuleError, match="stop.score"):
        AdaptiveRule.from_json({"rounds": [5], "stop": {}})
    rule = AdaptiveRule.from_json({"rounds": [2, 5], "stop": {"score": 10.0, "margin": 3.0},
                                   "gate": {"global_margin": 0.1}})
    assert AdaptiveRule.from_json(rule.to_json()) == rule
    s = np.array([[12, 1, 0, 0, 0, 0], [12, 11, 0, 0, 0, 0], [1, 2, 30, 0, 0, 0], [1, 2, 3, 4, 5, 6],
                  [12, 1, 0, 0, 0, 0]], float)
    g = np.array([[1.0, 0.5] + [0] * 4] * 4 + [[1.0, 0.95] + [0] * 4])  # the last query fails the gate
    # passes at 2 | margin too small at 2 and 5 | passes at 5 | never | starts at 5 (gate), passes there
    assert prefix_lengths(rule, s, g, 6).tolist() == [2, 6, 5, 6, 5]
    # the job's view before round 1 (positions < 2 scored): decided queries stop, the rest go on to 5
    assert prefix_lengths(rule, s, g, 6, known=2).tolist() == [2, 5, 5, 5, 5]


# ---------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def city(tmp_path_factory, ray_session):
    from pipeline import index
    root = tmp_path_factory.mktemp("city_adaptive")
    write_city(str(root / "db"), DB_ROWS, tokens=16, part_rows=160)
    write_city(str(root / "q"), QUERIES, tokens=16, part_rows=16, queries_of=DB_ROWS)
    index.build(index.IndexConfig(store=str(root / "db"), index_dir=str(root / "index")))
    return root


def _cfg(city, results, **kw):
    from pipeline.rerank import RerankConfig
    base = dict(query_store=str(city / "q"), database_store=str(city / "db"), index_dir=str(city / "index"),
                results=str(results), backbone="efficientnet-lite0", reranker=SCORER, candidates=K,
                partition_queries=16, batch_pairs=23, num_actors=2, image_size=[480, 640])
    base.update(kw)
    return RerankConfig(**base)


def _rows(results):
    from pipeline.rerank import read_results
    return read_results(results).to_pandas().sort_values(["query_id", "global_rank"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def full(city):
    from pipeline.rerank import run
    res = run(_cfg(city, city / "full"))
    return res, _rows(res.results)


def _rule_from(full_rows) -> dict:
    """A score threshold that about half the queries pass on their first 2 candidates."""
    first = full_rows[full_rows["global_rank"] <= 2].groupby("query_id")[f"rerank_score_{SCORER}"].max()
    return {SCORER: {"rounds": [2], "stop": {"score": float(np.median(first))}}}


@pytest.fixture(scope="module")
def adaptive(city, full):
    from pipeline.rerank import run
    rule = _rule_from(full[1])
    res = run(_cfg(city, city / "adaptive", adaptive=rule))
    return res, _rows(res.results), rule


def test_partitions_follow_the_scorer_slots(full):
    res, rows = full
    from pipeline.rerank.stage import PARTITIONS_PER_SLOT
    # 48 queries, 2 scorer slots: PARTITIONS_PER_SLOT (6) partitions per slot of 4 queries, not 3
    # of partition_queries = 16
    assert res.scorer_slots == 2 and res.partitions == 2 * PARTITIONS_PER_SLOT
    assert storage.read_json(str(Path(res.results) / "plan.json"))["score_partition_queries"] == \
        QUERIES // (2 * PARTITIONS_PER_SLOT)
    assert res.pairs_scored == {SCORER: QUERIES * K} and rows[f"rerank_score_{SCORER}"].notna().all()
    assert res.pairs_per_second > 0 and 0 < res.scoring_seconds < res.stage_seconds["rerank"]


def test_first_round_pass_stops_and_fail_continues(full, adaptive):
    _, f = full
    res, a, rule = adaptive
    col = f"rerank_score_{SCORER}"
    thr = rule[SCORER]["stop"]["score"]
    assert len(a) == len(f) and (a["image_id"].to_numpy() == f["image_id"].to_numpy()).all()
    scored = a[col].notna().groupby(a["query_id"]).sum()
    first = f[f["global_rank"] <= 2].groupby("query_id")[col].max()
    passed = first >= thr
    assert 0 < passed.sum() < len(passed)
    assert (scored[passed] == 2).all(), "a query that passed round 1 got more pairs"
    assert (scored[~passed] == K).all(), "a query that failed round 1 got no more pairs"
    # every score it did compute is the fixed run's, bit for bit; the cascade is the offline one
    on = a[col].notna().to_numpy()
    assert (a[col].to_numpy()[on] == f[col].to_numpy()[on]).all()
    s = f.pivot(index="query_id", columns="global_rank", values=col).to_numpy()
    g = f.pivot(index="query_id", columns="global_rank", values="global_score").to_numpy()
    want = prefix_lengths(AdaptiveRule.from_json(rule[SCORER]), s, g, K)
    assert (scored.sort_index().to_numpy() == want).all()
    # unscored candidates rank after the scored ones, in global order
    for _, q in a.groupby("query_id"):
        q = q.sort_values(f"rank_{SCORER}")
        n = int(q[col].notna().sum())
        assert q[col].iloc[:n].notna().all() and (np.diff(q["global_rank"].iloc[n:].to_numpy()) > 0).all()
    assert res.pairs_scored[SCORER] == int(scored.sum()) < QUERIES * K
    plan = storage.read_json(str(Path(res.results) / "plan.json"))
    assert plan["adaptive"] == rule and plan["rounds"] == [2, K]


def test_killed_between_and_during_rounds_resumes_to_the_same_rows(city, adaptive):
    """The folder as a driver killed in round 1 leaves it: round 0 committed; round 1's prefix
    lengths of some partitions (the rest not decided yet: between the rounds), one of its score
    files half-written without a marker, no parts. The rerun gives the uninterrupted rows."""
    from pipeline.rerank import run
    res, rows, rule = adaptive
    src, dst = Path(res.results), city / "adaptive_killed"
    shutil.copytree(src, dst)
    r1 = dst / "rounds" / "round-1"
    for m in sorted((r1 / "progress").glob("prefix-*.json"))[::2]:
        m.unlink()
    scores = sorted((r1 / "progress").glob("score-*.json"))
    (r1 / scores[0].name.replace(".json", ".parquet")).write_bytes(b"half a file")
    for m in scores:
        m.unlink()
    for f in list(dst.glob("part-*.parquet")) + list((dst / "progress").glob("*.json")) + [dst / "manifest.json"]:
        f.unlink()
    again = run(_cfg(city, dst, adaptive=rule))
    assert again.skipped_score_partitions == again.partitions and again.ok  # round 0 was not scored again
    assert _rows(again.results).equals(rows)


def test_another_rule_is_refused_naming_both(city, adaptive):
    from pipeline.rerank import run
    from pipeline.rerank.partitions import PlanMismatch
    res, _, rule = adaptive
    other = {SCORER: {"rounds": [3], "stop": {"margin": 0.01}}}
    with pytest.raises(PlanMismatch) as err:
        run(_cfg(city, res.results, adaptive=other))
    text = str(err.value)
    assert "adaptive: {token-similarity: rounds 2 score>=" in text and "rounds 3 margin>=0.01" in text
    with pytest.raises(PlanMismatch, match="none \\(every candidate\\)"):
        run(_cfg(city, res.results))


def test_sweep_fits_a_rule_on_full_results_and_refuses_adaptive_ones(city, full, adaptive, tmp_path, capsys):
    import yaml

    from pipeline import evaluate
    from pipeline.evaluate import EvaluateConfig
    res, _ = full
    rule_url = str(tmp_path / "rule.yaml")
    got = evaluate.run(EvaluateConfig(results=res.results, positive_radius=25, sweep_adaptive=True,
                                      write_rule=rule_url))
    rows = [r for r in got.adaptive_sweep if r["reranker"] == SCORER]
    fixed = {r["candidates"]: r for r in rows if r["kind"] == "fixed"}
    assert sorted(fixed) == [1, 5, K] and fixed[K]["pairs_per_query"] == K
    assert fixed[K]["recall@1"] == got.metrics["rerankers"][SCORER]["recall@1"]  # the replay is the job's order
    chosen = [r for r in rows if r.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["recall@1"] >= fixed[K]["recall@1"] - 0.01
    assert chosen[0]["pairs_per_query"] == min(r["pairs_per_query"] for r in rows if r["kind"] == "rule"
                                               and r["recall@1"] >= fixed[K]["recall@1"] - 0.01)
    written = yaml.safe_load(open(rule_url))
    assert written == {SCORER: chosen[0]["rule"]}
    assert AdaptiveRule.from_json(written[SCORER], SCORER)
    # an adaptive run's results: pairs per query in the metrics; the sweeps refuse, saying why
    ares, arows, _ = adaptive
    m = evaluate.run(EvaluateConfig(results=ares.results, positive_radius=25)).metrics[
        "rerankers"][SCORER]
    per_query = arows[f"rerank_score_{SCORER}"].notna().groupby(arows["query_id"]).sum()
    assert m["pairs_scored"] == ares.pairs_scored[SCORER] == int(per_query.sum())
    assert m["pairs_per_query"]["mean"] == pytest.approx(per_query.mean()) and m["pairs_per_query"]["p99"] == K
    for kw in (dict(sweep_candidates=[5]), dict(sweep_adaptive=True)):
        with pytest.raises(ValueError, match="adaptive run .* no score"):
            evaluate.run(EvaluateConfig(results=ares.results, positive_radius=25, **kw))
