"""report.html opened in headless Chromium: not blank, every image loaded, table == metrics.json."""
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
    cells = re.findall(r'<td data-key="(\w+)\.(recall@\d+)" data-value="([^"]*)">([^<]*)</td>', dom)
    assert len(cells) == 2 * len(metrics["global"]), cells
    for kind, key, value, text in cells:
        want = metrics[kind][key]
        assert json.loads(value) == want
        assert text == ("–" if want is None else f"{100 * want:.2f}")
    return {"images": total, "colours": colours, "cells": len(cells)}


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
