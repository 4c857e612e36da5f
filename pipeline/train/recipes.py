"""The official R²Former training recipes as data.

Each recipe is what one command of the official scripts sets (github.com/bytedance/R2Former, HEAD;
file:line references are to that tree), so ``r2f train --recipe NAME`` trains what the paper
trained unless a config names a deviation (see docs/training.md, "Project options").

    retrieval    train_global_retrieval.sh -> train_deit.py     stage 1, global descriptor only
    rerank       train_reranking.sh, first command               backbone frozen (--fix 1)
    finetune     train_reranking.sh, second command              --fix 0, local head input detached
    end_to_end   train_end_to_end.sh                             --fix 0 --finetune 1
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str                     # the official command it follows
    # loss (train_reranker.py:166-235): per negative slot, sum-reduced triplet loss on the global
    # descriptors and/or the reranker's mean cross-entropy over the slot's (q, p) and (q, n) pairs;
    # the total divided by global batch x negatives.
    triplet_loss: bool
    rerank_loss: bool
    margin: float = 0.1
    # what learns and how it runs
    trains: tuple[str, ...] = ("backbone", "local_head", "reranker")   # requires_grad (model.training parts)
    train_mode: tuple[str, ...] = ("backbone", "local_head", "reranker")
    local_grad_to_backbone: bool = False    # official --finetune: the rerank loss reaches blocks 0-10
    # optimizer: one parameter group over every trainable tensor
    optimizer: str = "adamw"                # "adamw" (betas 0.9/0.999, eps 1e-8) | "adam"
    lr: float = 1e-5
    weight_decay: float = 0.03              # AdamW only; every tensor decayed (no no-decay group)
    schedule: str = "warmup_cosine"         # "warmup_cosine" (per epoch) | "constant"
    warmup_epochs: int = 5
    # data
    epochs: int = 50
    batch_size: int = 64                    # queries per step, global over workers (train_batch_size)
    num_negatives: int = 1                  # negs_num_per_query
    mining: str = "partial"                 # "global" (precomputed hardest negatives) | "partial"
    patience: int = 3

    def with_options(self, **changes) -> Recipe:
        """This recipe with the given fields changed (None leaves a field as it is)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


RECIPES: dict[str, Recipe] = {
    # train_deit.py: bare DeiT, Adam on model.parameters() with lr only (:93-94, --optim default
    # 'adam', parser.py:27), no schedule (adjust_learning_rate only for adamw, :137-138), triplet
    # loss reduction='sum' (:102) summed over negative slots (:176-182) and divided by
    # train_batch_size x negs (:198); model.train() (:161). Command: lr 1e-5, batch 16, 2 negatives,
    # 100 epochs, patience 10, partial mining (train_global_retrieval.sh).
    "retrieval": Recipe(
        name="retrieval", source="train_global_retrieval.sh -> train_deit.py",
        triplet_loss=True, rerank_loss=False, trains=("backbone",), train_mode=("backbone",),
        optimizer="adam", lr=1e-5, weight_decay=0.0, schedule="constant", warmup_epochs=0,
        epochs=100, batch_size=16, num_negatives=2, mining="partial", patience=10),
    # train_reranking.sh first command: --fix 1 (only local_head and Reranker require grad,
    # train_reranker.py:66-73; model.eval() then Reranker.train(), :158-162), no triplet loss
    # (:180), AdamW wd 0.03 (:92), cosine with 5 warmup epochs (:291-305), lr 5e-4, 50 epochs,
    # batch 64, 1 negative from the global hardest 100, patience 25.
    "rerank": Recipe(
        name="rerank", source="train_reranking.sh (1st command) -> train_reranker.py",
        triplet_loss=False, rerank_loss=True, trains=("local_head", "reranker"), train_mode=("reranker",),
        optimizer="adamw", lr=5e-4, weight_decay=0.03, schedule="warmup_cosine", warmup_epochs=5,
        epochs=50, batch_size=64, num_negatives=1, mining="global", patience=25),
    # train_reranking.sh second command: --fix 0 without --finetune 1 (the local head's input is
    # detached, model/network.py:311-316), lr 1e-5, 20 epochs, batch 48, 2 negatives, partial mining.
    "finetune": Recipe(
        name="finetune", source="train_reranking.sh (2nd command) -> train_reranker.py",
        triplet_loss=True, rerank_loss=True, optimizer="adamw", lr=1e-5, weight_decay=0.03,
        schedule="warmup_cosine", warmup_epochs=5, epochs=20, batch_size=48, num_negatives=2,
        mining="partial", patience=50),
    # train_end_to_end.sh: --fix 0 --finetune 1, lr 1e-4, 100 epochs, batch 64, 1 negative.
    "end_to_end": Recipe(
        name="end_to_end", source="train_end_to_end.sh -> train_reranker.py",
        triplet_loss=True, rerank_loss=True, local_grad_to_backbone=True, optimizer="adamw", lr=1e-4,
        weight_decay=0.03, schedule="warmup_cosine", warmup_epochs=5, epochs=100, batch_size=64,
        num_negatives=1, mining="partial", patience=50),
}

# The former ``--stage`` names: each now runs the official recipe of the same name.
STAGE_ALIASES = {"retrieval": "retrieval", "rerank": "rerank", "finetune": "finetune"}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; recipes are {sorted(RECIPES)}") from None


def epoch_lr(recipe: Recipe, epoch: int) -> float:
    """The learning rate of every step of ``epoch`` (0-based), as the official
    ``adjust_learning_rate`` sets it at the start of each epoch (train_reranker.py:291-305):
    ``0.1 -> 1`` x lr linearly over the warmup epochs, then a cosine counted from epoch 0, so at
    the end of warmup the rate jumps to ``0.5 (1 + cos(pi warmup / epochs))`` x lr."""
    lr = recipe.lr
    if recipe.schedule == "constant":
        return lr
    if recipe.schedule != "warmup_cosine":
        raise ValueError(f"unknown schedule {recipe.schedule!r}")
    if epoch < recipe.warmup_epochs:
        alpha = epoch / recipe.warmup_epochs
        return lr * (0.1 * (1.0 - alpha) + alpha)
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / recipe.epochs))


def build_optimizer(params, recipe: Recipe, lr: float | None = None):
    """One parameter group over ``params`` (train_reranker.py:89-94, train_deit.py:93-94)."""
    import torch

    lr = recipe.lr if lr is None else lr
    params = list(params)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=recipe.weight_decay,
                                 amsgrad=False)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
