"""What the Gardens Point experiments (bench/gardens_point_protocol.py, bench/train_gardens_point.py)
start the same way: a smoke run in a temporary work folder, and the embedded Ray, logging and
torch threads they measure under."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def run_maybe_smoke(args, experiment: Callable[..., int], smoke_settings: Callable[..., None], prefix: str) -> int:
    """``experiment(args)``; with ``args.smoke`` at the smallest settings, in a temporary
    ``args.work`` removed afterwards."""
    if not args.smoke:
        return experiment(args)
    import shutil
    import tempfile
    smoke_settings(args)
    args.work = tempfile.mkdtemp(prefix=prefix)
    try:
        return experiment(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


def start(args) -> tuple[Path, Path]:
    """An embedded Ray of 2 CPUs (or RAY_ADDRESS), warnings-only logging, 2 torch threads; returns
    the work folder (created) and the data folder."""
    import torch

    from pipeline.cluster import ensure_ray
    from pipeline.log import setup_logging

    setup_logging("WARNING")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    ensure_ray(num_cpus=2)
    torch.set_num_threads(2)
    work, data = Path(args.work), Path(args.data)
    work.mkdir(parents=True, exist_ok=True)
    return work, data
