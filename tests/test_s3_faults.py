"""Transient S3 faults survived end to end: `r2f run` with every path on S3 (images, manifests, a
project checkpoint, stores, index, results, report) once straight to moto (``clean_run``) and once
in a process whose driver and Ray workers reach S3 only through a proxy that answers a seeded 10 %
of requests with 503 SlowDown or 500 InternalError, or drops the connection before forwarding or
after the server applied the request (``faulty_job``; tests/s3_runs.py, tests/s3_fault_proxy.py).
Both runs must give exactly the same result rows, error records and metrics (timing fields aside).
Then a reindex in that process, still through the proxy, adds an image to its run's store and must
publish exactly once."""
from __future__ import annotations

import copy

from s3_fault_proxy import KINDS

from pipeline import storage

pytest_plugins = ["s3_runs"]  # its session fixtures, shared with test_s3_seams.py and test_secrets.py
# metrics.json fields that measure time (pipeline/run.py): everything else must match exactly.
TIMING_SETTINGS = ("rerank_seconds", "pairs_per_second")


def without_timing(metrics: dict) -> dict:
    m = copy.deepcopy(metrics)
    m.pop("stage_seconds")
    for k in TIMING_SETTINGS:
        m["settings"].pop(k)
    return m


def test_run_and_reindex_through_s3_faults_match_the_clean_run(clean_run, faulty_job, s3_inputs):
    report, tail = faulty_job["report"], faulty_job["tail"]
    in_run, after_reindex = report["faults_run"], report["faults_reindex"]
    in_reindex = {k: after_reindex[k] - in_run[k] for k in in_run}
    print(f"faults injected during `r2f run`: {in_run}")
    print(f"faults injected during `r2f reindex`: {in_reindex}")
    assert report["codes"]["run"] == 0, f"faults {in_run}\n{tail}"
    faulty, b = faulty_job["outputs"], s3_inputs
    num_queries, k = len(b["q_frames"]), b["k"]

    # exactly the clean run's output
    assert clean_run["rows"] and len(clean_run["rows"]) == num_queries * k
    assert faulty["rows"] == clean_run["rows"]
    assert [e["path"] for e in clean_run["errors"]] == [s3_inputs["truncated"]]
    assert faulty["errors"] == clean_run["errors"]
    assert without_timing(faulty["metrics"]) == without_timing(clean_run["metrics"])
    assert faulty["metrics"]["num_queries"] == num_queries
    assert clean_run["report"] and faulty["report"]
    # the run's model came from the s3:// checkpoint: the store records the hash of its bytes
    assert storage.read_manifest(faulty_job["store"])["model"]["checkpoint_hash"] == s3_inputs["checkpoint_hash"]

    # the reindex through the proxy: the run's store gains one image, published exactly once
    assert report["codes"]["reindex"] == 0, f"faults {in_reindex}\n{tail}"
    before, after = report["index_before"], report["index_after"]
    number = int(before["current"]["version"].lstrip("v"))
    assert after["current"]["version"] == f"v{number + 1:04d}", (before, after)
    assert after["versions"] == before["versions"] + [after["current"]["version"]], (before, after)
    history = after["current"].get("history") or []
    assert len(history) == len(before["current"].get("history") or []) + 1, (before, after)
    assert history[0]["version"] == before["current"]["version"], (before, after)
    from pipeline import reindex
    index_dir = faulty_job["index_dir"]
    ids = reindex.version_image_ids(index_dir, after["current"]["version"]).tolist()
    added_id = storage.image_id_for(f"{b['bucket']}/imgs/day_right/Image{b['added_frame']:03d}.jpg")
    assert added_id in ids and len(ids) == len(b["db_frames"]) + 1, ids
    assert not storage.exists(storage.join(index_dir, "reindex.lock")), "the reindex left its lock behind"

    total = {k: after_reindex[k] for k in KINDS}
    print(f"faults injected in run and reindex: {total} of {after_reindex['requests']} requests "
          f"(rate {b['rate']}, seed {b['seed']})")
    assert all(total[k] >= 1 for k in KINDS), f"every fault kind must be injected at least once: {total}"

