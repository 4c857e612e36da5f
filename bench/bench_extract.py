"""Extraction benchmark: images/s through the pipeline next to the same model called directly.

On the same Gardens Point images and the same preprocessing (``pipeline.images.load_image``):

- direct: one process, decode + resize + ``model.extract`` in batches, torch on all cores
  (also the model-only rate on pre-decoded pixels);
- pipeline: ``pipeline.extract.extract_dataset`` on a local Ray with as many CPUs as cores,
  writing a real store (Parquet, Zarr, markers) to a temporary folder. Reported twice: end to
  end (including actor start-up and model build) and steady state (images of every shard after
  the first, over the time between the first and the last shard's progress marker).

The target is pipeline steady state >= 90 % of direct (decode + model).

    nice .venv/bin/python bench/bench_extract.py [--images 200] [--folder day_left] [--image-size 480,640]
        [--backbone efficientnet-lite0] [--checkpoint PATH] [--batch-size 8] [--shard-size 32]
    .venv/bin/python bench/bench_extract.py --smoke    # 8 images at 128x160 in shards of 4: seconds

The pipeline side joins the Ray cluster named by ``RAY_ADDRESS`` when set, else starts a local one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import extract, storage  # noqa: E402
from pipeline.cluster import ensure_ray  # noqa: E402
from pipeline.datasets import load_dataset  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.log import setup_logging  # noqa: E402


def direct(table, backbone, checkpoint, image_size, batch_size, threads) -> tuple[float, float]:
    """(images/s decode+model, images/s model only) in this process."""
    import torch

    from pipeline.device import choose_device, set_cpu_threads
    from pipeline.model import build_model

    set_cpu_threads(threads)
    kwargs = {"img_size": tuple(image_size)} if backbone == "r2former" else {}
    model = build_model(backbone, checkpoint, **kwargs)
    plan = choose_device("auto")
    model = model.place(plan) if hasattr(model, "place") else model.to(plan.device)
    paths = table.column("path").to_pylist()
    warm = np.stack([load_image(p, image_size).pixels for p in paths[:batch_size]])
    extract.forward(model, warm, batch_size, plan)  # first-call allocations and kernel choice

    t = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        pixels = np.stack([load_image(p, image_size).pixels for p in paths[start:start + batch_size]])
        extract.forward(model, pixels, batch_size, plan)
    e2e = len(paths) / (time.perf_counter() - t)

    pixels = np.stack([load_image(p, image_size).pixels for p in paths])
    t = time.perf_counter()
    extract.forward(model, pixels, batch_size, plan)
    model_only = len(paths) / (time.perf_counter() - t)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return e2e, model_only


def pipeline(table, store, config) -> tuple[float, float, extract.ExtractResult]:
    """(images/s end to end, images/s steady state, result)."""
    result = extract.extract_dataset(table, store, config, source="bench")
    markers = sorted((json.loads(p.read_text()) for p in Path(store, "progress").glob("shard-*.json")),
                     key=lambda m: m["finished_at"])
    steady = float("nan")
    if len(markers) > 1:
        later = sum(m["images"] for m in markers[1:])
        steady = later / (markers[-1]["finished_at"] - markers[0]["finished_at"])
    return result.images_per_second, steady, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gardens_point"))
    ap.add_argument("--folder", default="day_left")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--image-size", default="480,640")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--smoke", action="store_true", help="the smallest setting (tests/test_bench_scripts.py)")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.image_size, args.batch_size, args.shard_size = 8, "128,160", 4, 4
    setup_logging("WARNING")
    image_size = tuple(int(v) for v in args.image_size.split(","))
    cores = os.cpu_count() or 1
    threads = int(os.environ.get("R2F_TORCH_THREADS", "0")) or cores
    table = load_dataset(f"sequence:{Path(args.data) / args.folder}").slice(0, args.images)
    n = table.num_rows
    print(f"{n} Gardens Point images ({args.folder}), {image_size[0]}x{image_size[1]}, {args.backbone}, "
          f"batch {args.batch_size}, {cores} cores, torch threads {threads}", flush=True)

    # Direct runs before and after the pipeline: on a shared machine the load drifts.
    d1, m1 = direct(table, args.backbone, args.checkpoint, image_size, args.batch_size, threads)
    print(f"direct, one process, decode+model : {d1:8.2f} images/s  (before the pipeline)", flush=True)
    print(f"direct, one process, model only   : {m1:8.2f} images/s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench_extract_", dir=args.workdir))
    try:
        ensure_ray(num_cpus=cores)
        config = extract.ExtractConfig(backbone=args.backbone, checkpoint=args.checkpoint, image_size=image_size,
                                       batch_size=args.batch_size, shard_size=args.shard_size,
                                       chunk_rows=min(16, args.shard_size), progress=False)
        p_e2e, p_steady, result = pipeline(table, str(work / "store"), config)
        assert result.num_extracted == n, result
        assert storage.read_global_table(str(work / "store")).num_rows == n
    finally:
        shutil.rmtree(work, ignore_errors=True)
    d2, m2 = direct(table, args.backbone, args.checkpoint, image_size, args.batch_size, threads)
    print(f"direct, one process, decode+model : {d2:8.2f} images/s  (after the pipeline)")
    print(f"direct, one process, model only   : {m2:8.2f} images/s")
    d_e2e = (d1 + d2) / 2
    print(f"pipeline (Ray Data), end to end   : {p_e2e:8.2f} images/s  (incl. actor start and model build)")
    print(f"pipeline (Ray Data), steady state : {p_steady:8.2f} images/s")
    print(f"pipeline steady / direct decode+model (mean of both): {100 * p_steady / d_e2e:5.1f} %   (target >= 90 %)")
    print(f"pipeline end-to-end / direct decode+model (mean of both): {100 * p_e2e / d_e2e:5.1f} %")


if __name__ == "__main__":
    main()
