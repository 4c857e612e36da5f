"""Training R²Former (and the EfficientNet-Lite0 variant) on Ray Train with the official recipes.

    recipes.py   the official recipes as data (loss, optimizer, schedule, frozen parts) and the
                 per-epoch learning rate
    step.py      one training step on one batch (``step(model, batch, recipe, optimizer)``): what
                 the Ray Train loop runs and what bench/train_parity.py checks against the official code
    stage.py     configuration, data, validation, the Ray Train loop, checkpoints and resume, CLI

``r2f train --recipe rerank|finetune|end_to_end|retrieval`` and ``pipeline.train.run(TrainConfig)``.
"""
from ..config import ConfigError
from .recipes import RECIPES, Recipe, build_optimizer, epoch_lr, get_recipe
from .stage import (RECALL_KS, STAGES, STATE_FILE, DataConfig, TrainConfig, TrainResult, _Step, _triplet_loss,
                    best_positives, build_training_model, describe, deviations, fold_adapter, latest_checkpoint,
                    nearest_rows, read_state, recall_at, register_cli, rerank_recall_at, resolve_recipe, run,
                    token_adapter, validate)
from .step import Batch, StepOutput, allreduce_gradients, losses, prepare_model, step, triplet_rows

__all__ = ["ConfigError", "RECIPES", "Recipe", "build_optimizer", "epoch_lr", "get_recipe", "RECALL_KS", "STAGES",
           "STATE_FILE", "DataConfig", "TrainConfig", "TrainResult", "best_positives", "build_training_model",
           "describe", "deviations", "fold_adapter", "latest_checkpoint", "nearest_rows", "read_state", "recall_at",
           "register_cli", "rerank_recall_at", "resolve_recipe", "run", "token_adapter", "validate", "Batch",
           "StepOutput", "allreduce_gradients", "losses", "prepare_model", "step", "triplet_rows",
           "_Step", "_triplet_loss"]
