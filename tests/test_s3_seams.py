"""The seams of a cluster that keeps everything on S3 (moto's real S3 server on 127.0.0.1): model
files opened from s3:// by every stage, an overwritten checkpoint fetched again, outputs in a
missing bucket refused before any work, stores of two models never scored together."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline import extract, storage
from pipeline.rerank import RerankConfig
from pipeline.rerank import run as rerank_run

pytest_plugins = ["s3_runs"]  # the clean S3 run, shared with test_s3_faults.py

ROOT = Path(__file__).resolve().parents[1]
SIZE = [128, 224]


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _extract(dataset: str, store: str, checkpoint: str) -> dict:
    extract.run(extract.ExtractConfig(dataset=dataset, store=store, backbone="efficientnet-lite0",
                                      checkpoint=checkpoint, image_size=SIZE, batch_size=4, shard_size=4,
                                      chunk_rows=2, progress=False))
    return storage.read_manifest(store)


def test_s3_checkpoint_in_every_stage_refetched_when_overwritten(clean_run, s3_inputs, tmp_path):
    """The database store and index are the clean `r2f run`'s (tests/s3_runs.py: extraction and
    the run's driver opened the s3:// checkpoint there); this test adds rerank and an overwrite."""
    import torch

    from pipeline.model import EfficientNetLite0VPR

    fs, base = s3_inputs["fs"], f"{s3_inputs['base']}/seams"
    db, index_dir = storage.join(clean_run["out"], "database_store"), storage.join(clean_run["out"], "index")
    manifest_a = storage.read_manifest(db)
    assert manifest_a["model"]["checkpoint_hash"] == s3_inputs["checkpoint_hash"]

    # Checkpoint A (the bytes the run used) at a URL no process has opened yet.
    ckpt = f"{base}/models/effnet.pt"
    fs.copy(s3_inputs["checkpoint"], ckpt)

    # Rerank: the driver (reranker resolution, query extraction) and the scorer actors (the
    # learned reranker's model) open the s3:// checkpoint.
    q1 = f"{base}/stores/q1"
    res = rerank_run(RerankConfig(query_store=q1, database_store=db, index_dir=index_dir,
                                  results=f"{base}/results1", queries=s3_inputs["queries"],
                                  backbone="efficientnet-lite0", checkpoint=ckpt, image_size=SIZE,
                                  reranker="r2former", candidates=2, allow_untrained_reranker=True))
    assert res.num_pairs == len(s3_inputs["q_frames"]) * 2
    assert storage.read_manifest(q1)["model"]["checkpoint_hash"] == manifest_a["model"]["checkpoint_hash"]

    # Checkpoint B (A's model, its weights scaled) overwrites A at the same URL: fetched again, its
    # hash recorded, its weights run.
    model = EfficientNetLite0VPR.pretrained()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    b = model.save_checkpoint(tmp_path / "b.pt")
    fs.put(str(b), ckpt)
    q2 = f"{base}/stores/q2"
    manifest_b = _extract(s3_inputs["queries"], q2, ckpt)
    assert manifest_b["model"]["checkpoint_hash"] == _sha256(Path(b)) != manifest_a["model"]["checkpoint_hash"]
    d1 = storage.read_global_descriptors(q1)[1]
    d2 = storage.read_global_descriptors(q2)[1]
    assert d1.shape == d2.shape and not np.allclose(d1, d2, atol=1e-3)

    # The queries of model B against the database of model A: refused, both stores named.
    with pytest.raises(storage.StoreMismatch) as err:
        rerank_run(RerankConfig(query_store=q2, database_store=db, index_dir=index_dir,
                                results=f"{base}/results2", reranker="ransac", candidates=2))
    assert q2 in str(err.value) and db in str(err.value) and "checkpoint_hash" in str(err.value)
    assert not fs.exists(f"{base}/results2/manifest.json")


def test_output_in_a_missing_bucket_fails_fast_and_creates_nothing(s3_endpoint, s3_bucket):
    import boto3

    missing = f"r2f-missing-{uuid.uuid4().hex[:8]}"
    sample = ROOT / "demo" / "gardens_point_sample"
    commands = {
        "--out": ["run", "--database", f"sequence:{sample}/day_right", "--queries", f"sequence:{sample}/night_right",
                  "--backbone", "efficientnet-lite0", "--out", f"s3://{missing}/out"],
        "--store": ["extract", "--dataset", f"sequence:{sample}/day_right", "--backbone", "efficientnet-lite0",
                    "--store", f"s3://{missing}/store"],
        "--results": ["rerank", "--query-store", f"{s3_bucket}/q", "--database-store", f"{s3_bucket}/db",
                      "--index", f"{s3_bucket}/index", "--results", f"s3://{missing}/results"],
    }
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    for opt, argv in commands.items():
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        took, err = time.perf_counter() - started, proc.stderr
        assert proc.returncode == 2, (opt, proc.stdout, err)
        assert missing in err and opt in err and "does not exist" in err, err
        assert "Traceback" not in err and "local Ray" not in err and "fetched checkpoint" not in err, err
        # Timings are not asserted here (a loaded machine is slow to import torch): the command
        # stops before Ray or a model, which the log lines above show; it printed its time.
        print(f"{opt} in a missing bucket refused after {took:.1f} s")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert missing not in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_run_radius_follows_the_dataset_kind():
    from pipeline.run import RunConfig, check_config

    assert check_config(RunConfig(database="sequence:/d", queries="q", out="o")).positive_radius == 2.0
    assert check_config(RunConfig(database="/d/db.csv", queries="q", out="o")).positive_radius == 25.0
    assert check_config(RunConfig(database="sequence:/d", queries="q", out="o", positive_radius=5)).positive_radius == 5


def test_store_model_signature_mismatch_names_the_field():
    a = {"layout_version": 2, "model": {"backbone": "efficientnet-lite0", "checkpoint_hash": "sha256:1"},
         "global_dim": 1280, "preprocessing": {"image_size": [128, 224]}, "tokens": 112}
    storage.check_same_model(("query store", "s3://x/q", a), ("database store", "s3://x/db", dict(a)))
    b = {**a, "global_dim": 256, "model": {"backbone": "efficientnet-lite0", "checkpoint_hash": "sha256:1"}}
    with pytest.raises(storage.StoreMismatch, match=r"s3://x/q and database store s3://x/db .*global_dim 1280 vs 256"):
        storage.check_same_model(("query store", "s3://x/q", a), ("database store", "s3://x/db", b))
    c = {**a, "preprocessing": {"image_size": [480, 640]}}
    with pytest.raises(storage.StoreMismatch, match="image_size"):
        storage.check_same_model(("query store", "s3://x/q", a), ("database store", "s3://x/db", c))
    assert storage.extraction_size(c) == (480, 640)
