"""The training stage: ``run(TrainConfig) -> TrainResult`` on Ray Train, and ``r2f train``.

``r2f train --recipe rerank|finetune|end_to_end|retrieval --config configs/train_X.yaml``. Recipes
(``recipes.py``) are the official ones; ``--stage retrieval|rerank|finetune`` is a deprecated alias
of the recipe of the same name.

Dataflow::

    TrainConfig ──► config.validate (recipe, deviations, inputs) ──► output checked, start weights
    fetched ──► newest finished checkpoint of <output>/<name> (resume) ──► TorchTrainer over
    ``loop.train_loop`` on ``num_workers`` workers (gloo on CPU, NCCL on GPU), each epoch a
    checkpoint through Ray Train's storage (local or s3://) ──► TrainResult(newest checkpoint)

Distributed layout: every worker derives the same mining rounds and permutations from ``seed``
and the epoch, so workers agree on the data without exchanging it; descriptor caches for mining
and validation are computed split across workers and all-gathered. The global batch is the
recipe's ``batch_size``; worker r takes items ``r::W`` of it and ``step.step`` sums the gradients
over workers, so the update is the official one on the global batch.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

from .. import storage
from ..config import load_config, parse_use_gpu, to_dict
from ..log import get_logger
from .checkpoints import latest_checkpoint, ray_storage
from .config import STAGES, TrainConfig, deviations, recipe_name, validate
from .recipes import RECIPES, STAGE_ALIASES

log = get_logger(__name__)


@dataclass
class TrainResult:
    checkpoint: str                         # folder or URL of the newest checkpoint
    model_path: str                         # <checkpoint>/model.pt
    metrics: dict[str, Any]
    epochs_run: int
    seconds: float


def run(config: TrainConfig) -> TrainResult:
    """Train one recipe (see the module docstring). Resumes from ``<output>/<name>`` when it holds a
    checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..cluster import cluster_gpus, ensure_ray
    from .loop import train_loop

    if not config.recipe and config.stage:
        recipe_name(config)          # the deprecation warning, once, in the driver
    recipe = validate(config)
    dev = deviations(config)
    if dev:
        log.warning("recipe %s with project deviations from the official one: %s", recipe.name, dev)
    storage.check_output(config.output, "--output")  # before Ray starts or a model loads
    if config.checkpoint:  # fails fast on a missing file; workers fetch the same object per node
        from ..weights import fetch
        log.info("start weights %s (%s)", config.checkpoint, fetch(config.checkpoint).sha256)
    ensure_ray(config.ray_address)
    wanted = parse_use_gpu(config.use_gpu)
    use_gpu = cluster_gpus() > 0 if wanted == "auto" else wanted
    storage_path, fs = ray_storage(config.output)
    if fs is None:
        os.makedirs(storage_path, exist_ok=True)
    resume_url, resume_state = latest_checkpoint(config.output, config.name)
    if resume_url:
        log.info("resuming %s from %s (epoch %d)", config.name, resume_url, resume_state["epoch"])
        if resume_state.get("stopped") or resume_state["epoch"] >= recipe.epochs:
            log.info("run %s already finished (epoch %d)", config.name, resume_state["epoch"])
    resources = {"CPU": config.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": to_dict(config), "resume": resume_url},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures)),
    )
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    url, state = latest_checkpoint(config.output, config.name)
    if url is None:
        raise RuntimeError(f"training {config.name} finished without a checkpoint under {config.output}")
    metrics = dict(result.metrics or {}) or (state["history"][-1] if state and state["history"] else {})
    return TrainResult(checkpoint=url, model_path=storage.join(url, "model.pt"), metrics=metrics,
                       epochs_run=int(state["epoch"]), seconds=seconds)


# ====================================================================== CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from ..config import add_config_arguments

    p = subparsers.add_parser("train", help="train an official recipe (rerank, finetune, end_to_end, retrieval) "
                                            "on Ray Train")
    add_config_arguments(p)
    p.add_argument("--recipe", choices=sorted(RECIPES), help="overrides the config's recipe")
    p.add_argument("--stage", choices=STAGES, help="deprecated alias: runs the recipe of the same name")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.stage:
        warnings.warn(f"--stage is deprecated; use --recipe {STAGE_ALIASES[args.stage]}", DeprecationWarning,
                      stacklevel=2)
        if not args.recipe:
            overrides.append(f"recipe={STAGE_ALIASES[args.stage]}")
    if args.recipe:
        overrides.append(f"recipe={args.recipe}")
    cfg = load_config(TrainConfig, args.config, overrides)
    result = run(cfg)
    print(json.dumps({"checkpoint": result.checkpoint, "model": result.model_path, "epochs": result.epochs_run,
                      "seconds": round(result.seconds, 1),
                      "metrics": {k: v for k, v in result.metrics.items() if k != "step_losses"}}, default=str))
    return 0
