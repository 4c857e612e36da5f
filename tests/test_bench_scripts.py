"""Every script in bench/ runs its smallest setting against today's code, so none can rot silently.

Each runnable script runs in its own subprocess (as a user runs it), on tiny data, and must exit 0
and print its figure lines (no timing is asserted: the figures are the benches' business). The
Ray ones join this session's Ray through ``RAY_ADDRESS`` instead of starting one each. Libraries
(bench/city.py, bench/official_child.py) are covered through their callers. Scripts that need what
CI lacks say so and skip in smoke mode: bench_official.py without the official R²Former checkout
prints its skip line and still runs the project side.

The per-script wall times and their total are printed at the end with the load average (other
jobs share the machine); bench scripts are kept small enough for the whole file to fit in about
a minute on an idle 2-core machine.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GARDENS_POINT, PARITY

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# Imported by the scripts below, never run on their own.
LIBRARIES = {
    "city.py": "the synthetic city (bench_mine, bench_validation, city_strays, bench_city)",
    "official_child.py": "the official side of bench_official (runs in the official checkout's venv)",
    "gp_common.py": "the Gardens Point experiments' start (gardens_point_protocol, train_gardens_point)",
}

OFFICIAL_SKIP = "official R2Former checkout not found"

# script -> (arguments; {tmp} is a fresh folder), lines its output must contain (regular expressions)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "bench_extract.py": (["--smoke"], [r"direct, one process, decode\+model : +[\d.]+ images/s",
                                       r"pipeline \(Ray Data\), steady state : +[\d.nan]+ images/s"]),
    "bench_index.py": (["--smoke"], [r"\| 2,000 \| uniform \| default \|", r"\| 2,000 \| clustered \| exact \|"]),
    "bench_mine.py": (["--smoke"], [r"validation top-K step \(50 queries x 500 database",
                                    r"mine 64 queries x 512 database .* wall [\d.]+ s",
                                    r"plain FAISS IndexFlatIP, same queries", r"ratio mining wall / plain search"]),
    "bench_validation.py": (["--smoke"], [r"rerank-stage validation \(4 queries x 5 candidates.*pairs/s",
                                          r"retrieval validation top-K step \(50 queries x 500 database"]),
    "bench_model.py": (["--smoke"], [r"extraction 128x160: [\d.]+ images/s", r"reranking: [\d.]+ pairs/s",
                                     r"float16 token storage", r"memory, rerank 4 candidates",
                                     r"official-style reranker, 2 pairs"]),
    "bench_official.py": (["--smoke"], [r"\n +64 +2 +[\d.]+", r"per-phase profile of ours",
                                        r"224 x 224: R2Former backbone .* M params"]),
    "city_strays.py": (["--smoke"], [r"part 0: \d+ pairs, \d+ queries",
                                     r"score partition 0: fetched [\d.]+ GB for \d+ distinct candidates"]),
    "gardens_point_protocol.py": (["--smoke"], [r"\| global retrieval \| - \|", r"\| RANSAC \| 4 \|",
                                                r"test: places 6-11", r"\| learned reranker \| 4 \|"]),
    "train_gardens_point.py": (["--smoke"], [r"mine: 8 queries", r"train: 1 epochs",
                                             r"trained reranker, top-4 candidates: R@1/5/10"]),
    # owned by the training work: its smallest documented setting is one recipe
    "train_parity.py": (["--recipes", "rerank"], [r"\| rerank \| .* \| yes \|"]),
    # owned by the rerank work (issue 25)
    "bench_rerank.py": (["--smoke"], [r"database: 16 images extracted and indexed", r"\n +ransac +2 +8 +[\d.]+"]),
    "bench_city.py": (["--smoke"], [r"\n +32 +fixed +320 +\d+ +[\d.]+",
                                    r"\n +32 job efficiency: job \d+ pairs/s .* direct \d+ pairs/s .* ratio [\d.]+"]),
    # owned by the serve work
    "bench_serve.py": (["--smoke"], [r"in-process reference \(decode \+ extract 1 \+ search \+ rerank 10\): [\d.]+ ms",
                                     r"\n +2 +2 +0 +[\d.]+", r"service RSS after 1 requests \d+ MiB, after 4"]),
    "adaptive_gardens_point.py": (["--smoke"], [r"fixed K = 5 +[\d.]+", r"adaptive +[\d.]+"]),
    "bench_output_check.py": (["--smoke"], [r"r2f extract --store +median +[\d.]+ s .*exit \[2\]"]),
}

TIMES: dict[str, float] = {}


def test_every_bench_script_is_covered():
    """A new script in bench/ needs a smoke case here (or to be declared a library)."""
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts - set(CASES) - set(LIBRARIES) == set(), "bench scripts without a smoke case"
    assert set(LIBRARIES) <= scripts


@pytest.fixture(scope="module")
def bench_env(ray_session, request):
    """The subprocesses' environment: this session's Ray, 2 torch threads."""
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, R2F_TORCH_THREADS="2",
               RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0",
               PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    yield env
    total = time.perf_counter() - start
    if TIMES:
        lines = [f"bench smoke runs (wall s, {os.cpu_count()} CPUs):"]
        lines += [f"  {name:28s} {secs:7.1f}" for name, secs in TIMES.items()]
        lines.append(f"  {'sum of runs':28s} {sum(TIMES.values()):7.1f}   (module wall {total:.1f} s; load average "
                     f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())})")
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n" + "\n".join(lines), flush=True)


@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_script_smoke(script, bench_env, tmp_path):
    if not (BENCH / script).exists():
        pytest.skip(f"bench/{script} is not in this checkout")
    if script != "bench_official.py" and not GARDENS_POINT.exists() and script in (
            "bench_extract.py", "gardens_point_protocol.py", "train_gardens_point.py", "bench_rerank.py"):
        pytest.fail(f"Gardens Point data not found at {GARDENS_POINT} (set R2F_SHARED)")
    if script in ("bench_model.py", "bench_official.py", "train_parity.py") and not PARITY.exists():
        pytest.fail(f"parity fixtures not found at {PARITY} (set R2F_SHARED)")
    args, expected = CASES[script]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    t = time.perf_counter()
    done = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=tmp_path, env=bench_env,
                          capture_output=True, text=True, timeout=900)
    TIMES[script] = time.perf_counter() - t
    out = done.stdout
    assert done.returncode == 0, f"bench/{script} {' '.join(args)} exited {done.returncode}:\n" \
                                 f"{out[-3000:]}\n{done.stderr[-5000:]}"
    assert out.strip(), f"bench/{script} printed nothing"
    if script == "bench_official.py":
        official = os.environ.get("R2F_OFFICIAL_DIR")
        if official and (Path(official) / "model" / "R2Former.py").is_file():
            expected = [*expected, r"== reranker \(bench/bench_official.py\)"]
        else:
            assert OFFICIAL_SKIP in out and "official side skipped" in out, out
    missing = [p for p in expected if not re.search(p, out)]
    assert not missing, f"bench/{script}: no line matching {missing} in:\n{out[-4000:]}"
