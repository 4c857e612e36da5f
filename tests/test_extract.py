"""Extraction on a local Ray: real Gardens Point images, real model (efficientnet-lite0), Parquet and
Zarr on a real S3 endpoint, bad inputs, and resume after the driver is SIGKILLed mid-run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli, extract, storage
from pipeline.images import load_image

SIZE = (128, 224)  # small, multiple of 16, keeps the CPU tests fast
ROOT = Path(__file__).resolve().parents[1]


def _config(**kw):
    base = dict(backbone="efficientnet-lite0", image_size=SIZE, batch_size=4, shard_size=4, chunk_rows=2,
                progress=False)
    return extract.ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    from pipeline.model import build_model
    return build_model("efficientnet-lite0")


def _direct(model, paths):
    """The in-process reference: same preprocessing, one direct model call."""
    import torch

    from pipeline.model import normalize_images
    pixels = np.stack([load_image(p, SIZE).pixels for p in paths])
    feats = model.extract(normalize_images(torch.from_numpy(pixels))).cpu_float()
    return feats.global_descriptor.numpy(), feats.local_tokens.numpy()


def test_s3_store_with_bad_inputs_matches_direct_model(ray_session, s3_bucket, gardens_point, model, tmp_path):
    import fsspec
    fs = fsspec.filesystem("s3", **storage.storage_options(s3_bucket))
    good = [gardens_point / "day_left" / f"Image{i:03d}.jpg" for i in range(8)]
    for p in good:
        fs.put(str(p), f"{s3_bucket}/data/imgs/{p.name}")
    real = good[0].read_bytes()
    fs.pipe(f"{s3_bucket}/data/imgs/corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg" * 20)
    fs.pipe(f"{s3_bucket}/data/imgs/empty.jpg", b"")
    fs.pipe(f"{s3_bucket}/data/imgs/truncated.jpg", real[: len(real) * 2 // 5])
    rel = [f"imgs/{p.name}" for p in good] + ["imgs/corrupt.jpg", "imgs/empty.jpg", "imgs/truncated.jpg",
                                               "imgs/missing.jpg", "s3://r2f-no-such-bucket-x/a.jpg"]
    fs.pipe(f"{s3_bucket}/data/manifest.csv",
            ("path,utm_east,utm_north,condition\n"
             + "".join(f"{p},{i}.0,0.0,{'night' if i % 2 else ''}\n" for i, p in enumerate(rel))).encode())
    dataset, store = f"{s3_bucket}/data/manifest.csv", f"{s3_bucket}/stores/db"

    result = extract.run(_config(dataset=dataset, store=store))
    assert (result.num_images, result.num_extracted, result.num_failed) == (13, 8, 5)
    assert result.skipped_shards == [] and not result.too_many_failures

    manifest = storage.read_manifest(store)
    assert manifest["shards"] == [0, 1, 2, 3] and manifest["counts"] == {"images": 13, "extracted": 8, "failed": 5}
    assert manifest["model"]["checkpoint_hash"].startswith("sha256:") and manifest["tokens"] > 0
    # The store's descriptor width is the model's: plain 1280-d GeM for EfficientNet-Lite0 by default.
    assert manifest["global_dim"] == model.config.global_dim == 1280

    # Every bad input is in the errors table with the stage that caught it.
    errors = {r["path"].rsplit("/", 1)[-1]: r for r in storage.read_errors(store).to_pylist()}
    assert {k: v["stage"] for k, v in errors.items()} == {
        "corrupt.jpg": "decode", "truncated.jpg": "decode", "empty.jpg": "read", "missing.jpg": "read",
        "a.jpg": "read"}
    assert "empty" in errors["empty.jpg"]["reason"] and "not found" in errors["missing.jpg"]["reason"]

    # Parquet (from S3) and Zarr (from S3) equal a direct in-process call on the same images.
    table = storage.read_global_table(store)
    assert table.num_rows == 8 and len(set(table.column("image_id").to_pylist())) == 8
    by_key = {p.rsplit("/", 1)[-1]: i for i, p in enumerate(table.column("path").to_pylist())}
    order = [by_key[p.name] for p in good]
    ref_global, ref_tokens = _direct(model, [str(p) for p in good])
    np.testing.assert_allclose(storage.descriptors_of(table)[order], ref_global, atol=2e-4)
    rows = table.column("row").to_numpy()[order]
    assert list(rows) == list(range(8))  # manifest order: sorted keys put the good images first
    tokens = storage.read_local_tokens(store, rows)
    assert tokens.shape == ref_tokens.shape
    np.testing.assert_allclose(tokens, ref_tokens.astype(np.float16).astype(np.float32), atol=2e-3, rtol=2e-3)
    assert table.column("width").to_pylist()[0] == 960 and table.column("height").to_pylist()[0] == 540
    assert table.column("utm_east").to_pylist() == [float(i) for i in range(8)]
    # The manifest's condition column is the store's tag (blank cells: null).
    assert table.column("tag").to_pylist() == ["night" if i % 2 else None for i in range(8)]
    meta = storage.parquet_metadata(storage.StoreLayout(store).global_part(0))
    assert meta["layout_version"] == storage.LAYOUT_VERSION and meta["preprocessing"]["image_size"] == list(SIZE)
    assert meta["checkpoint_hash"] == manifest["model"]["checkpoint_hash"]

    # The CLI on the finished store: everything skipped; --max-failures decides the exit code.
    argv = ["extract", "--dataset", dataset, "--store", store, "--backbone", "efficientnet-lite0",
            "--image-size", "128,224", "--shard-size", "4", "--batch-size", "4", "--set", "chunk_rows=2",
            "--no-progress"]
    assert cli.main(argv + ["--max-failures", "2"]) == 3
    assert cli.main(argv + ["--max-failures", "50%"]) == 0
    assert cli.main(argv) == 0
    assert storage.read_global_table(store).num_rows == 8


def _markers(progress: Path) -> list[dict]:
    out = []
    for p in sorted(progress.glob("shard-*.json")) if progress.exists() else []:
        try:
            out.append(json.loads(p.read_text()))
        except ValueError:  # being replaced right now
            pass
    return out


def _wait(cond, driver, what, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert driver.poll() is None, f"the driver ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_resume_after_actor_kill_and_driver_sigkill(ray_session, gardens_point, tmp_path):
    """A model actor is killed mid-run (Ray Data restarts it and retries its shard), then the driver
    is SIGKILLed while shards are still left (asserted: some, not all, finished, no manifest); the
    rerun skips the finished shards and ends with exactly one row per image."""
    n = 20
    paths = [gardens_point / "day_right" / f"Image{i:03d}.jpg" for i in range(n)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    store = tmp_path / "store"
    progress = store / "progress"
    # One model actor: after its restart it is the only writer, so the driver is killed within a
    # poll interval of the restarted actor's first shard, with most shards still to do.
    cfg = dict(dataset=str(manifest), store=str(store), shard_size=1, chunk_rows=1, batch_size=1, num_actors=1)
    code = ("from pipeline import extract; from pipeline.log import setup_logging; setup_logging(); "
            f"extract.run(extract.ExtractConfig(**{_config(**cfg).__dict__!r}))")
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONPATH=str(ROOT))
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _markers(progress), driver, "the first shard")
        first = _markers(progress)[0]
        os.kill(first["pid"], signal.SIGKILL)  # the model actor process this run started
        _wait(lambda: any(m["pid"] != first["pid"] for m in _markers(progress)), driver,
              "a restarted actor wrote a shard")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finished_before = _markers(progress)
    assert len({m["pid"] for m in finished_before}) >= 2
    # The kill landed mid-run: some shards, not all, finished, and the store is not yet visible.
    assert 2 <= len(finished_before) < n, len(finished_before)
    assert not (store / "manifest.json").exists()

    result = extract.run(_config(**cfg))
    assert result.num_extracted == n and result.num_failed == 0
    assert len(result.skipped_shards) >= len(finished_before) >= 2
    table = storage.read_global_table(str(store))
    ids = table.column("image_id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n  # exactly one row per image
    assert sorted(table.column("row").to_pylist()) == list(range(n))
    tokens = storage.read_local_tokens(str(store), np.arange(n))
    assert np.all(np.abs(tokens).sum(axis=(1, 2)) > 0)  # every Zarr row written
    assert [m["shard"] for m in _markers(progress)] == list(range(n))

    # A rerun with a different layout refuses to mix shards into this store.
    with pytest.raises(storage.StoreError, match="shard_size"):
        extract.run(_config(**{**cfg, "shard_size": 4}))


def test_config_checks():
    with pytest.raises(ValueError, match="chunk_rows"):
        extract.run(_config(dataset="x", store="y", shard_size=6, chunk_rows=4))
    assert extract.parse_max_failures("5%", 200) == 10
    assert extract.parse_max_failures("0.1", 50) == 5
    assert extract.parse_max_failures(3, 50) == 3
    with pytest.raises(ValueError, match="max_failures"):
        extract.parse_max_failures("lots", 5)
