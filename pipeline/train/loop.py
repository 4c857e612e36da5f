"""The per-worker Ray Train loop: build the model the recipe prepares, resume from a checkpoint,
then per epoch set the learning rate, train on the recipe's data (``stages.data_kind``), validate,
track early stopping and write a checkpoint (rank 0) and report.

Every step is ``step.step`` on this worker's share of the global batch; gradients are summed over
workers inside it, and the step's loss is summed here so every worker logs the global batch's loss.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from ..config import from_dict
from ..log import get_logger
from .checkpoints import build_training_model, load_train_state, ray_storage, write_checkpoint
from .config import TrainConfig, deviations, resolve_recipe
from .recipes import Recipe, build_optimizer, epoch_lr, set_lr
from .stages import data_kind
from .step import Batch, prepare_model, step

log = get_logger(__name__)


class Trainer:
    """What the data of a recipe drives on one worker: the model (and token adapter) in the recipe's
    train modes, and one optimisation step per batch."""

    def __init__(self, cfg: TrainConfig, recipe: Recipe, model, adapter, optimizer, world: int):
        self.cfg, self.recipe, self.model, self.adapter, self.optimizer = cfg, recipe, model, adapter, optimizer
        self.world = world

    def set_train_mode(self) -> None:
        from ..model import training as mt

        mt.set_modes(self.model, self.recipe.train_mode, freeze_batchnorm=self.cfg.freeze_batchnorm)
        if self.adapter is not None:
            self.adapter.train()

    def step(self, batch: Batch) -> float:
        """One step; returns the global batch's loss (the workers' shares summed)."""
        import torch
        import torch.distributed as dist

        out = step(self.model, batch, self.recipe, self.optimizer, adapter=self.adapter,
                   rerank_weight=self.cfg.rerank_weight)
        value = torch.tensor([out.loss], dtype=torch.float64)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(value)
        return float(value)

    def capped(self, steps: int) -> bool:
        """Whether ``steps`` reached ``max_steps_per_epoch``."""
        return bool(self.cfg.max_steps_per_epoch) and steps >= self.cfg.max_steps_per_epoch


def train_loop(loop_config: dict) -> None:
    """The per-worker training function handed to TorchTrainer: ``{"config": TrainConfig as a dict,
    "resume": checkpoint URL or None}``."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from ..device import set_cpu_threads
    from ..log import setup_logging
    from ..model import training as mt

    setup_logging()
    cfg = from_dict(TrainConfig, loop_config["config"])
    recipe = resolve_recipe(cfg, warn=False)
    kind = data_kind(recipe)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_cpu_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()

    model = build_training_model(cfg)
    tokens = kind.on_tokens(cfg)
    trainable = prepare_model(model, recipe, "tokens" if tokens else "images", cfg.freeze_batchnorm)
    adapter = mt.token_adapter(model) if (tokens and cfg.token_adapter) else None
    params = [p for p in model.parameters() if p.requires_grad]
    if adapter is not None:
        params += list(adapter.parameters())
    optimizer = build_optimizer(params, recipe)

    state = {"epoch": 0, "step": 0, "history": [], "best_recall@5": -1.0, "not_improved": 0, "stopped": False}
    # Ray hands back the newest checkpoint of this run after a worker failure; a new driver resumes
    # from the one ``run`` found in storage (V2 dropped ``resume_from_checkpoint``).
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and loop_config.get("resume"):
        path, fs = ray_storage(loop_config["resume"])
        ckpt = ray.train.Checkpoint(path, filesystem=fs)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved, state = load_train_state(d)
        model.load_state_dict(saved["model"])
        if adapter is not None and saved.get("adapter") is not None:
            adapter.load_state_dict(saved["adapter"])
        optimizer.load_state_dict(saved["optimizer"])
        log.info("rank %d resumed from epoch %d (step %d)", rank, state["epoch"], state["step"])

    model.to(device)
    if adapter is not None:
        adapter.to(device)
    trainer = Trainer(cfg, recipe, model, adapter, optimizer, world)
    data = kind(cfg, recipe, rank, world, device)
    validation = kind.validation(cfg, rank, world, device) if kind.validation.configured(cfg) else None
    if rank == 0:
        log.info("recipe %s (%s): %d trainable tensors, %s, start epoch %d, deviations %s", recipe.name,
                 recipe.source, len(trainable), mt.freeze_state(model), state["epoch"], deviations(cfg) or "none")

    while state["epoch"] < recipe.epochs and not state["stopped"]:
        epoch = state["epoch"]
        t0 = time.perf_counter()
        lr = epoch_lr(recipe, epoch)     # per epoch, as the official adjust_learning_rate
        set_lr(optimizer, lr)
        losses = data.epoch(epoch, trainer)
        val = validation(model, adapter) if validation is not None else {}
        state["step"] += len(losses)
        state["epoch"] = epoch + 1
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": state["step"], "recipe": recipe.name, "lr": lr,
                                   "loss": float(np.mean(losses)) if losses else float("nan"),
                                   "step_losses": [float(x) for x in losses],
                                   "epoch_seconds": time.perf_counter() - t0}
        metrics.update({f"val_{k}": v for k, v in val.items()})
        _early_stopping(state, val, recipe.patience)
        metrics["best_recall@5"] = state["best_recall@5"]
        metrics["stopped_early"] = state["stopped"]
        state["history"].append({k: v for k, v in metrics.items() if k != "step_losses"}
                                | {"step_losses": metrics["step_losses"]})
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                write_checkpoint(d, model, adapter, optimizer, state, cfg, recipe)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)
        log.info("epoch %d: lr %.3g loss %.4f %s", epoch + 1, lr, metrics["loss"],
                 {k: round(v, 2) for k, v in val.items()})
    if dist.is_initialized():
        dist.barrier()


def _early_stopping(state: dict, val: dict[str, float], patience: int) -> None:
    """Track the best validation recall@5 and stop after ``patience`` epochs without a better one
    (no validation, no stopping)."""
    if "recall@5" not in val:
        return
    if val["recall@5"] > state["best_recall@5"]:
        state["best_recall@5"], state["not_improved"] = val["recall@5"], 0
    else:
        state["not_improved"] += 1
    state["stopped"] = state["not_improved"] >= patience


