"""Ray job entrypoints on a real Ray head (127.0.0.1, token auth, job server): `ray job submit` of
jobs.extract on real Gardens Point images, then the Parquet it wrote and its JSON summary; and a
job whose input is missing exits non-zero, naming the input."""
import importlib
import json
import shutil

import numpy as np
import pytest
import yaml
from ray_head import ROOT, RayHead

from jobs import common
from pipeline import storage

SIZE = [128, 224]
JOBS = ("extract", "index", "mine", "train", "rerank", "evaluate", "reindex")
JOBS_ON_DISK = tuple(p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem not in ("__init__", "common", "specs"))


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2).start()
    yield head
    head.stop()


def _images(gardens_point, dest, n):
    dest.mkdir(parents=True)
    for i in range(n):
        shutil.copy(gardens_point / "day_left" / f"Image{i:03d}.jpg", dest / f"Image{i:03d}.jpg")
    return dest


def _submit(head, job, config):
    cmd = common.submit_command(job, str(config), address=head.dashboard_url)
    assert cmd[:3] == ["ray", "job", "submit"]
    return head.ray_cli(*cmd[1:], timeout=420)


def test_extract_job_submitted_to_a_ray_head(ray_head, gardens_point, tmp_path):
    data = _images(gardens_point, tmp_path / "images", 6)
    store = tmp_path / "store"
    config = tmp_path / "extract.yaml"
    config.write_text(yaml.safe_dump(dict(dataset=str(data), store=str(store), backbone="efficientnet-lite0",
                                          image_size=SIZE, batch_size=4, shard_size=4, chunk_rows=2,
                                          progress=False)))
    proc = _submit(ray_head, "extract", config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:] + ray_head.log_tail()
    assert "succeeded" in out

    table = storage.read_global_table(str(store))
    assert table.num_rows == 6
    assert sorted(table.column("image_id").to_pylist()) == sorted(
        storage.image_id_for(f"Image{i:03d}.jpg") for i in range(6))
    desc = storage.descriptors_of(table)
    assert desc.shape == (6, storage.read_manifest(str(store))["global_dim"]) and np.isfinite(desc).all()
    assert np.allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-3)
    assert sorted(set(table.column("shard").to_pylist())) == [0, 1]

    summary = json.loads((store / "job-extract.json").read_text())
    assert summary["status"] == "succeeded" and summary["exit_code"] == 0
    assert summary["counts"]["num_images"] == 6 and summary["counts"]["num_extracted"] == 6
    assert summary["stage_seconds"]["run"] > 0 and summary["stage_seconds"]["total"] >= summary["stage_seconds"]["run"]
    assert summary["ray_job_submission_id"]  # it really ran as a submitted Ray job
    assert summary["ray"]["cpus"] == 2


def test_failing_job_exits_non_zero_and_names_the_input(ray_head, tmp_path):
    missing = tmp_path / "no-such-images"
    store = tmp_path / "store"
    config = tmp_path / "extract.yaml"
    config.write_text(yaml.safe_dump(dict(dataset=str(missing), store=str(store), backbone="efficientnet-lite0",
                                          image_size=SIZE, progress=False)))
    proc = _submit(ray_head, "extract", config)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert str(missing) in out  # the log names the input that failed
    summary = json.loads((store / "job-extract.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 1
    assert str(missing) in summary["error"]["message"] and str(missing) in summary["error"]["inputs"]


def test_bad_config_key_exits_2_without_touching_ray(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("dataset: x\nstorre: y\n")
    assert importlib.import_module("jobs.extract").main(["--config", str(config)]) == common.EXIT_CONFIG


@pytest.mark.parametrize("job", JOBS)
def test_every_job_names_a_real_stage(job):
    import dataclasses

    from jobs.specs import JOBS

    spec = importlib.import_module(f"jobs.{job}").SPEC
    assert spec is JOBS[job] and callable(spec.function) and dataclasses.is_dataclass(spec.config_class)
    assert spec.stage.startswith("pipeline.")
    assert (ROOT / "configs" / "jobs" / f"{job}.yaml").exists()
    assert sorted(JOBS) == sorted(JOBS_ON_DISK)


def test_summary_goes_next_to_the_outputs():
    from dataclasses import make_dataclass
    Store = make_dataclass("Store", [("store", str)])
    Out = make_dataclass("Out", [("output", str)])
    assert common.summary_path("extract", Store("s3://b/store")) == "s3://b/store/job-extract.json"
    assert common.summary_path("mine", Out("/x/negatives.parquet")) == "/x/negatives.parquet.job-mine.json"


STOP_SCRIPT = """
import dataclasses, os, signal, sys, time
import pipeline.cluster
from jobs import common
pipeline.cluster.ensure_ray = lambda address=None: None   # this check is about signals, not Ray
@dataclasses.dataclass
class SlowConfig:
    out: str = ""
def run(cfg):
    os.kill(os.getpid(), signal.SIGTERM)   # what `ray job stop` sends the entrypoint
    time.sleep(30)
sys.exit(common.run_job(common.JobSpec("slow", SlowConfig, run), None, ["out=" + sys.argv[1]]))
"""


def test_stopped_job_writes_its_summary_and_exits_143(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", STOP_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == common.EXIT_STOPPED, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "job-slow.json").read_text())
    assert summary["status"] == "stopped" and "resubmit" in proc.stderr
