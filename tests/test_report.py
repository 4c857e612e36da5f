"""report.html opened in headless Chromium: not blank, every image loaded, table == metrics.json;
one row per method per sampled query, grouped by tag; the learned reranker's ``explain``."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.report import match_figure, write_report
from pipeline.rerank import RESULTS_SCHEMA

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=10000"]

_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  document.body.setAttribute('data-images-total', imgs.length);
  document.body.setAttribute('data-images-loaded', imgs.filter(i => i.complete && i.naturalWidth > 0).length);
});
</script></body>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        pytest.fail("Chromium not found: install it (`apt-get install -y chromium`, as .ci/run does)")
    return exe


def _chromium(args: list[str], profile: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def check_report_in_chromium(report: Path, metrics: dict) -> dict:
    """Open ``report`` in headless Chromium; assert the page is not blank, every image loaded and
    every table value equals ``metrics``. Returns what it measured."""
    report = Path(report)
    probe = report.with_name("_probe_report.html")  # same folder, so the relative links resolve the same
    probe.write_text(report.read_text().replace("</body>", _PROBE, 1))
    with tempfile.TemporaryDirectory() as profile:
        shot = Path(profile) / "shot.png"
        r = _chromium([f"--screenshot={shot}", "--window-size=1280,1600", report.as_uri()], profile)
        assert shot.exists(), f"no screenshot: {r.stderr[-2000:]}"
        px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
        dom = _chromium(["--dump-dom", probe.as_uri()], profile).stdout
    probe.unlink()
    # Not blank: real contrast and many distinct colours (photos, plot), not a white page.
    colours = len(np.unique(px.reshape(-1, 3)[::7].astype(np.uint8), axis=0))
    assert px.std() > 20 and colours > 200, (px.std(), colours)
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert total > 0 and loaded == total, f"{loaded} of {total} images loaded"
    cells = re.findall(r'<td data-key="([^"]+)" data-value="([^"]*)">([^<]*)</td>', dom)
    assert len(cells) == expected_cells(metrics), cells
    for key, value, text in cells:
        want = metric_at(metrics, key)
        assert json.loads(value) == want, key
        assert text == ("–" if want is None else f"{100 * want:.2f}")
    return {"images": total, "colours": colours, "cells": len(cells), "dom": dom}


def metric_at(metrics: dict, key: str):
    """The metrics.json value at a report cell's ``data-key`` ("rerankers.ransac.recall@1"; a tag
    of ``by_tag`` may itself hold dots, so the longest key that leads somewhere wins)."""
    def walk(d, parts):
        if not parts:
            return True, d
        for i in range(len(parts), 0, -1):
            k = ".".join(parts[:i])
            if isinstance(d, dict) and k in d:
                found, v = walk(d[k], parts[i:])
                if found:
                    return True, v
        return False, None
    found, v = walk(metrics, key.split("."))
    assert found, f"{key} is not in metrics.json"
    return v


def expected_cells(metrics: dict) -> int:
    """Table cells a report shows: per N, global plus each reranker (``rerankers``, else the one
    ``reranked``), and the same for every tag of ``by_tag``."""
    def methods(d: dict) -> int:   # global order is the "none" column, never a second time
        return len([m for m in d if m != "none"])
    n = len(metrics["global"]) * (1 + (methods(metrics["rerankers"]) if metrics.get("rerankers") else 1))
    for t in (metrics.get("by_tag") or {}).values():
        n += len(t["global"]) * (1 + methods(t.get("rerankers") or {}))
    return n


def _image(path: Path, seed: int):
    rng = np.random.default_rng(seed)
    img = (rng.random((9, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).resize((320, 180), Image.NEAREST).save(path)


def test_report_in_chromium(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in range(12):
        _image(imgs / f"{i}.jpg", i)
    rows = []
    for q in range(3):
        for j in range(6):
            c = (q * 3 + j) % 12
            rows.append({"query_id": 100 + q, "query_path": str(imgs / f"{q}.jpg"), "rank": 6 - j, "global_rank": j + 1,
                         "image_id": c, "candidate_path": str(imgs / f"{c}.jpg"), "global_score": 1.0 - j / 10,
                         "rerank_score": float(j), "query_utm_east": float(3 * q + 5), "query_utm_north": 0.0,
                         "candidate_utm_east": float(c), "candidate_utm_north": 0.0})
    results = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    metrics = {"global": {"recall@1": 0.0, "recall@5": 2 / 3, "recall@10": 2 / 3, "recall@20": 2 / 3,
                          "recall@100": None},
               "reranked": {"recall@1": 1 / 3, "recall@5": 1.0, "recall@10": 1.0, "recall@20": 1.0,
                            "recall@100": None},
               "num_queries": 3, "num_queries_without_positive": 0, "settings": {"reranker": "ransac"},
               "stage_seconds": {"rerank": 1.0}}
    out = tmp_path / "out"
    url = write_report(str(out), metrics, results, radius=2, image_size=(272, 480))
    assert Path(url) == out / "report.html"
    assert (out / "report_assets" / "recall.png").exists()
    html = (out / "report.html").read_text()
    assert 'data-correct="true"' in html and 'data-correct="false"' in html
    # Links are relative and stay inside the folder (self-contained when copied).
    assert all(not s.startswith(("/", "file:", "http")) for s in re.findall(r'src="([^"]+)"', html))
    seen = check_report_in_chromium(out / "report.html", metrics)
    assert seen["images"] == 1 + 3 * (1 + 5 + 5)  # plot + per query: itself, top-5 before, top-5 after


def test_match_figure_draws_inliers(tmp_path):
    rng = np.random.default_rng(1)
    _image(tmp_path / "a.jpg", 1)
    xy = np.stack(np.meshgrid(np.linspace(0.05, 0.95, 10), np.linspace(0.05, 0.5, 6)), -1).reshape(-1, 2)
    feat = rng.normal(size=(len(xy), 128))
    q = np.concatenate([xy, np.ones((len(xy), 1)), feat], 1).astype(np.float32)
    c = q.copy()
    c[:, 0] += 0.03  # the same tokens, shifted: every mutual match is an inlier of a translation
    png, matches, inliers = match_figure(str(tmp_path / "a.jpg"), str(tmp_path / "a.jpg"), q, c, (272, 480))
    assert matches == len(xy) and inliers >= 0.9 * len(xy)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_reads_a_results_folder(tmp_path):
    """The report takes the rerank job's folder (parts + manifest) as it takes a table."""
    from pipeline.rerank import results as R
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in range(6):
        _image(imgs / f"{i}.jpg", i)
    rows = [{"query_id": 100 + q, "query_path": str(imgs / f"{q}.jpg"), "rank": 5 - j, "global_rank": j + 1,
             "image_id": j, "candidate_path": str(imgs / f"{j}.jpg"), "global_score": 1.0 - j / 10,
             "rerank_score": float(j), "query_utm_east": float(q), "query_utm_north": 0.0,
             "candidate_utm_east": float(j), "candidate_utm_north": 0.0} for q in range(2) for j in range(5)]
    table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    folder = str(tmp_path / "results")
    R.write_part(folder, 0, table.slice(0, 5), {})
    R.write_part(folder, 1, table.slice(5, 5), {})
    metrics = {"global": {"recall@1": 0.5}, "reranked": {"recall@1": 1.0}, "num_queries": 2,
               "num_queries_without_positive": 0, "settings": {}, "stage_seconds": {}}
    html_folder = Path(write_report(str(tmp_path / "a"), metrics, folder, radius=1, image_size=(272, 480))).read_text()
    html_table = Path(write_report(str(tmp_path / "b"), metrics, table, radius=1, image_size=(272, 480))).read_text()
    assert html_folder.count("<figure") == html_table.count("<figure") == 2 * (1 + 5 + 5)


# ---------------------------------------------------------------- several rerankers, tags, explain
MULTI_SCHEMA = pa.schema(list(RESULTS_SCHEMA) + [
    ("rank_ransac", pa.int32()), ("rerank_score_ransac", pa.float32()),
    ("rank_r2former", pa.int32()), ("rerank_score_r2former", pa.float32()), ("query_tag", pa.string())])
TAGS = ["night", "night", "day", "day", None]


def _stores_with_tokens(root: Path, paths: list[str], seed: int, tokens: int = 24) -> tuple[str, np.ndarray]:
    """A one-shard store keyed by ``paths`` with random local tokens; returns (store, image ids)."""
    from helpers_store import write_tiny_store

    from pipeline import storage
    store = str(root)
    rng = np.random.default_rng(seed)
    ids, _ = write_tiny_store(store, [rng.standard_normal((len(paths), 8)).astype(np.float32)], keys=[paths])
    arr = storage.create_local_tokens(store, len(paths), tokens, len(paths))
    tok = np.concatenate([rng.uniform(0, 0.55, (len(paths), tokens, 2)), rng.uniform(0, 1, (len(paths), tokens, 1)),
                          rng.standard_normal((len(paths), tokens, 128))], 2)
    arr[:] = tok.astype(np.float16)
    return store, ids


def _multi_results(imgs: Path, q_ids: np.ndarray, d_ids: np.ndarray) -> pa.Table:
    rows = []
    for q in range(len(q_ids)):
        for j in range(6):
            c = (q * 2 + j) % len(d_ids)
            ransac, learned = 6 - j, (j + 2) % 6 + 1    # reversed / rotated global order
            rows.append({"query_id": int(q_ids[q]), "query_path": str(imgs / f"q{q}.jpg"), "rank": ransac,
                         "global_rank": j + 1, "image_id": int(d_ids[c]), "candidate_path": str(imgs / f"{c}.jpg"),
                         "global_score": 1.0 - j / 10, "rerank_score": float(j), "query_utm_east": float(2 * q + 5),
                         "query_utm_north": 0.0, "candidate_utm_east": float(c), "candidate_utm_north": 0.0,
                         "rank_ransac": ransac, "rerank_score_ransac": float(j), "rank_r2former": learned,
                         "rerank_score_r2former": 1.0 / learned, "query_tag": TAGS[q]})
    rows.sort(key=lambda r: (r["query_id"], r["rank"]))
    return pa.Table.from_pylist(rows, schema=MULTI_SCHEMA)


def _recalls(a: float) -> dict:
    return {"recall@1": a, "recall@5": min(1.0, a + 0.25), "recall@10": 1.0}


def test_report_one_row_per_method_grouped_by_tag(tmp_path):
    import torch

    from pipeline.model import R2Former
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in range(12):
        _image(imgs / f"{i}.jpg", i)
    for q in range(len(TAGS)):
        _image(imgs / f"q{q}.jpg", 50 + q)
    q_store, q_ids = _stores_with_tokens(tmp_path / "q_store", [str(imgs / f"q{q}.jpg") for q in range(len(TAGS))], 1)
    d_store, d_ids = _stores_with_tokens(tmp_path / "d_store", [str(imgs / f"{i}.jpg") for i in range(12)], 2)
    results = _multi_results(imgs, q_ids, d_ids)
    rerankers = {"ransac": _recalls(0.4), "r2former": _recalls(0.6)}
    metrics = {"global": _recalls(0.2), "reranked": rerankers["ransac"], "rerankers": rerankers,
               "by_tag": {"night": {"global": _recalls(0.0), "rerankers": {"ransac": _recalls(0.5),
                                                                           "r2former": _recalls(0.5)},
                                    "num_queries": 2},
                          "day": {"global": _recalls(0.5), "rerankers": {"ransac": _recalls(0.5),
                                                                         "r2former": _recalls(1.0)},
                                  "num_queries": 2}},
               "num_queries": 5, "num_queries_without_positive": 0, "settings": {"reranker": "ransac,r2former"},
               "stage_seconds": {"rerank": 1.0}}
    torch.manual_seed(0)
    model = R2Former(init_weights=False)   # random weights: the test checks the drawing, not the pairs
    model.has_trained_reranker = True
    out = tmp_path / "out"
    write_report(str(out), metrics, results, radius=2, image_size=(272, 480), query_store=q_store,
                 database_store=d_store, samples=6, match_pairs=2, model=model)
    seen = check_report_in_chromium(out / "report.html", metrics)
    dom = seen["dom"]
    methods = ["none", "ransac", "r2former"]
    # The plot has one curve per method and the table one column per method.
    assert re.search(r'id="recall-plot"[^>]*data-methods="none,ransac,r2former"', dom)
    head = re.search(r'<table class="recalls" id="recalls">(.*?)</table>', dom).group(1)
    assert re.findall(r'<th data-method="([^"]+)"', head) == methods
    # Every sampled query: one row per method, in order, each its top-5.
    samples = re.findall(r'<div class="sample" data-query="(\d+)"(?: data-tag="([^"]*)")?>(.*?)(?=<div class="sample"|</section>)',
                         dom, re.S)
    assert len(samples) == len(TAGS)           # 6 samples over 3 groups (night, day, untagged): 2 + 2 + 1
    for qid, _tag, body in samples:
        assert re.findall(r'<div class="group" data-method="([^"]+)"', body) == methods, qid
        assert body.count("<figure") == 1 + 3 * 5
    # Examples grouped by tag, tags in order, the untagged query last.
    assert [t for _, t, _ in samples] == ["day", "day", "night", "night", ""]
    assert re.findall(r'<section class="tag-group"(?: data-tag="([^"]*)")?>', dom) == ["day", "night", ""]
    # Recalls per tag: a table each (their cells are checked against metrics.json above).
    assert re.findall(r'<table class="recalls" data-tag="([^"]+)"', dom) == ["day", "night"]
    # The RANSAC inliers beside the learned reranker's pairs, for each of the two matched pairs.
    assert dom.count('data-panel="ransac"') == dom.count('data-panel="r2former"') == 2
    assert seen["images"] == 1 + len(TAGS) * (1 + 3 * 5) + 2 * 2
    # Read back from a results folder (its plan names the rerankers), without a model: the same
    # rows per method, and only RANSAC's panel.
    from pipeline import storage
    from pipeline.rerank import results as R
    folder = str(tmp_path / "results")
    R.write_part(folder, 0, results, {})
    storage.write_json(R.ResultsLayout(folder).plan, {"rerankers": ["ransac", "r2former"]})
    html = Path(write_report(str(tmp_path / "plain"), metrics, folder, radius=2, image_size=(272, 480),
                             query_store=q_store, database_store=d_store, samples=1, match_pairs=1)).read_text()
    assert html.count('data-panel="ransac"') == 1 and 'data-panel="r2former"' not in html
    rows = re.findall(r'<div class="group" data-method="([^"]+)"', html)
    assert rows == methods * (len(rows) // 3) and len(rows) == 3 * 3   # 1 sample in each of 3 groups


def test_explain_returns_sorted_pairs_and_leaves_the_fast_path_alone():
    import torch

    from pipeline.model.reranker import RerankTransformer
    torch.manual_seed(3)
    rr = RerankTransformer(num_local=40, depth=2, depth_corr=1).eval()
    g = torch.Generator().manual_seed(4)
    q = torch.cat([torch.rand(2, 30, 3, generator=g), torch.randn(2, 30, 128, generator=g)], 2)
    c = torch.cat([torch.rand(2, 26, 3, generator=g), torch.randn(2, 26, 128, generator=g)], 2)
    with torch.no_grad():
        before = rr(q, c).clone()
    with torch.inference_mode():                 # as callers inside the scorers would
        pairs = rr.explain(q[1], c[1], top=12)
    with torch.no_grad():
        after = rr(q, c)
    assert torch.equal(before, after)
    assert all(p.grad is None for p in rr.parameters())
    assert 0 < len(pairs) <= 12
    assert np.isfinite(pairs.weight).all() and np.isfinite(pairs.similarity).all()
    assert np.all(np.diff(pairs.weight) <= 0)                       # highest weight first
    assert pairs.query_index.min() >= 0 and pairs.query_index.max() < 30
    assert pairs.candidate_index.min() >= 0 and pairs.candidate_index.max() < 26
    assert len({(i, j) for i, j, _ in pairs}) == len(pairs)         # a pair once (both sides summed)
    # It explains the forward's own logits (the mirrored front half has not drifted).
    assert pairs.margin == pytest.approx(float(before[1, 1] - before[1, 0]), abs=1e-4)
    # The similarity is the pair's feature cosine.
    i, j = int(pairs.query_index[0]), int(pairs.candidate_index[0])
    cos = torch.nn.functional.cosine_similarity(q[1, i, 3:], c[1, j, 3:], dim=0)
    assert pairs.similarity[0] == pytest.approx(float(cos), abs=1e-5)


def test_recall_against_pairs_plot_and_table_2_with_an_adaptive_row():
    """The pairs study (fixed K and Pareto rules, as ``evaluate.pairs_study`` gives it) becomes one
    plot and the paper's Table 2 with an adaptive row, every cell keyed by its path; an adaptive
    run's own point is its adaptive row."""
    from pipeline.report import _table2, pairs_plot

    block = {"recall@1": 0.8, "recall@5": 0.9, "recall@10": 0.95}
    metrics = {"global": dict(block), "rerankers": {"ransac": {**block, "pairs_scored": 400,
                                                                "pairs_per_query": {"mean": 20.0, "p50": 20, "p99": 20}}}}
    study = {"ransac": {"fixed": [{"candidates": k, **block, "recall@1": 0.5 + 0.015 * k, "pairs_per_query": float(k)}
                                  for k in (1, 5, 10, 20)],
                        "rules": [{"rule": {"rounds": [5], "stop": {"score": 40.0}}, "describe": "rounds 5 score>=40",
                                   "chosen": True, **block, "recall@1": 0.79, "pairs_per_query": 7.5}],
                        "chosen": {"rounds": [5], "stop": {"score": 40.0}}}}
    png = pairs_plot(metrics, study)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(__import__("io").BytesIO(png)).size[0] > 100
    table = _table2(metrics, study)
    assert [f"K = {k}" in table for k in (1, 5, 10, 20)] == [True] * 4
    assert 'data-pairs-key="pairs_study.ransac.fixed.3.recall@1" data-value="0.8"' in table
    assert 'data-pairs-key="pairs_study.ransac.rules.0.pairs_per_query" data-value="7.5"' in table
    assert "rounds 5 score&gt;=40" in table
    # an adaptive run: no study (its scores stop early), its own block is the adaptive row
    adaptive = dict(metrics, settings={"adaptive": {"ransac": {"rounds": [5], "stop": {"score": 40.0}}}})
    table = _table2(adaptive)
    assert 'data-pairs-key="rerankers.ransac.pairs_per_query.mean" data-value="20.0"' in table and "K = " not in table
    assert pairs_plot(adaptive) is not None and pairs_plot({"global": block, "rerankers": {}}) is None
