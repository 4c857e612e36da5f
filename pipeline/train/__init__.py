"""Training R²Former (and the EfficientNet-Lite0 variant) on Ray Train with the official recipes.

    recipes.py            the official recipes as data (loss, optimizer, schedule, frozen parts) and
                          the per-epoch learning rate
    step.py               one training step on one batch (``step(model, batch, recipe, optimizer)``): what
                          the loop runs and what bench/train_parity.py checks against the official code
    config.py             TrainConfig / DataConfig, the recipe a config names, its deviations, checks
    stages.py             one class of training data per ``Recipe.mining``:
      partial_mining.py     triplets of images from partial mining (retrieval, finetune, end_to_end)
      hardest_negatives.py  items from the global hardest negatives, images or stored tokens (rerank)
    data.py               image and token sources, dataset positions, descriptors split over workers
    validation.py         Recall@N of the global descriptor and of the reranker during training
    loop.py               the per-worker Ray Train loop
    checkpoints.py        start model, checkpoint files, train state, resume, Ray Train storage
    stage.py              ``run(TrainConfig) -> TrainResult`` and ``r2f train``

``r2f train --recipe rerank|finetune|end_to_end|retrieval`` and ``pipeline.train.run(TrainConfig)``.
Importing this package loads neither torch nor Ray: they load when a model is built or a run starts.
"""
from ..config import ConfigError
from .checkpoints import STATE_FILE, build_training_model, latest_checkpoint, read_state
from .config import STAGES, DataConfig, TrainConfig, deviations, resolve_recipe, validate
from .hardest_negatives import best_positives
from .recipes import RECIPES, Recipe, build_optimizer, epoch_lr, get_recipe
from .stage import TrainResult, register_cli, run
from .step import Batch, StepOutput, allreduce_gradients, losses, prepare_model, step, triplet_rows
from .validation import RECALL_KS, _Step, _triplet_loss, global_recall_at, nearest_rows, rerank_recall_at

# The global-descriptor recall under its name in tests and bench scripts.
recall_at = global_recall_at

# Names whose home is ``pipeline.model.training`` (pure PyTorch), loaded on first use so that
# importing this package does not load torch.
_FROM_MODEL_TRAINING = {"describe": "describe", "token_adapter": "token_adapter", "fold_adapter": "fold_token_adapter"}


def __getattr__(name: str):
    if name in _FROM_MODEL_TRAINING:
        from ..model import training

        return getattr(training, _FROM_MODEL_TRAINING[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "RECIPES", "Recipe", "build_optimizer", "epoch_lr", "get_recipe", "RECALL_KS", "STAGES",
           "STATE_FILE", "DataConfig", "TrainConfig", "TrainResult", "best_positives", "build_training_model",
           "describe", "deviations", "fold_adapter", "global_recall_at", "latest_checkpoint", "nearest_rows",
           "read_state", "recall_at", "register_cli", "rerank_recall_at", "resolve_recipe", "run", "token_adapter",
           "validate", "Batch", "StepOutput", "allreduce_gradients", "losses", "prepare_model", "step",
           "triplet_rows", "_Step", "_triplet_loss"]
