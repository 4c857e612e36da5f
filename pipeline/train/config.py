"""Training configuration: what a run reads (``TrainConfig``, ``DataConfig``), which official recipe
it names and where it deviates from it, and the checks that refuse a config before any worker starts.

A config names a recipe (``recipes.RECIPES``); each recipe field it sets to something other than
None is a project deviation, logged and kept in the run's state. ``stage`` is the deprecated
spelling of ``recipe`` (``recipes.STAGE_ALIASES``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import ConfigError, parse_use_gpu
from .recipes import RECIPES, STAGE_ALIASES, Recipe
from .stages import data_kind

STAGES = tuple(STAGE_ALIASES)


@dataclass
class DataConfig:
    """Where the images, stored features and mined negatives of one split come from."""

    queries: str = ""               # dataset spec (pipeline.datasets.load_dataset) of the queries
    database: str = ""              # dataset spec of the database
    queries_store: str = ""         # extraction store of the queries (rerank stage)
    database_store: str = ""        # extraction store of the database (rerank stage)
    hardest_negatives: str = ""     # `r2f mine` output for these queries against this database


@dataclass
class TrainConfig:
    recipe: str | None = None               # rerank | finetune | end_to_end | retrieval (recipes.RECIPES)
    stage: str | None = None                # deprecated alias of `recipe` (retrieval, rerank, finetune)
    name: str = "r2former"                  # run name: checkpoints live under <output>/<name>
    output: str = "runs"                    # local folder or s3:// URL (Ray Train storage)
    backbone: str = "r2former"              # r2former | efficientnet-lite0
    checkpoint: str | None = None           # start weights (project or official layout)
    init: Literal["checkpoint", "pretrained", "random"] = "checkpoint"
    model: dict = field(default_factory=dict)   # extra constructor arguments (e.g. a tiny test config)
    train: DataConfig = field(default_factory=DataConfig)
    val: DataConfig = field(default_factory=DataConfig)
    image_size: list[int] = field(default_factory=lambda: [480, 640])   # H, W

    # The recipe's settings; None keeps the official value, anything else is a deviation (logged).
    epochs: int | None = None
    batch_size: int | None = None           # queries per step, global over workers (train_batch_size)
    lr: float | None = None
    weight_decay: float | None = None       # AdamW only
    optimizer: str | None = None            # adamw | adam
    schedule: str | None = None             # warmup_cosine (per epoch, official) | constant
    warmup_epochs: float | None = None
    num_negatives: int | None = None        # negatives per query (negs_num_per_query)
    margin: float | None = None
    patience: int | None = None             # early stop: epochs without a better val recall@5
    max_steps_per_epoch: int = 0            # 0 = no cap (a cap keeps tests and smoke runs short)

    # mining (radii in the datasets' position units: metres, or frames for sequences)
    positive_radius: float = 10.0
    negative_radius: float = 25.0
    val_radius: float = 25.0
    queries_per_epoch: int = 5000
    cache_queries: int = 1000               # queries per partial-mining refresh
    database_subset: int = 1000             # random database images per refresh (negative pool)
    cache_passes: int = 1                   # passes over each refresh's triplets (1 = VG benchmark)
    negatives_top: int = 100                # rerank: negatives drawn from this many hardest
    # Project options (docs/training.md): official values by default.
    rerank_source: Literal["tokens", "images"] = "images"   # tokens: the fast stored-token path (reranker
                                            # and token adapter only; local_head cannot learn from images)
    token_adapter: bool = True              # rerank on stored tokens: learn the local projection as a
                                            # linear map on the stored features, folded in when saving
    rerank_weight: float = 1.0              # weight of the reranking cross-entropy (official: 1)
    freeze_batchnorm: bool = True           # BatchNorm layers keep their statistics (tiny per-worker batches)
    val_candidates: int = 20                # rerank validation: candidates reranked per query
    augment: str = "none"                   # rerank on stored tokens: "homography" warps each candidate's
                                            # token positions by a random near-identity homography
    augment_scale: float = 0.08             # its corner offsets, a fraction of the longer image side

    # distribution
    num_workers: int = 2
    use_gpu: str = "auto"                   # auto | true | false (config.parse_use_gpu)
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    ray_address: str | None = None
    seed: int = 0
    official_layout: bool = False
    keep_checkpoints: int = 2
    max_failures: int = 0


# Config fields that override a recipe field of the same name.
_RECIPE_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "schedule", "warmup_epochs",
                   "num_negatives", "margin", "patience")


def recipe_name(cfg: TrainConfig, warn: bool = True) -> str:
    """``cfg.recipe``, else the deprecated ``cfg.stage`` (with a warning), else ``retrieval``."""
    if cfg.recipe:
        if cfg.stage and STAGE_ALIASES.get(cfg.stage) != cfg.recipe:
            raise ConfigError(f"stage {cfg.stage!r} (deprecated) contradicts recipe {cfg.recipe!r}; set recipe only")
        return cfg.recipe
    if cfg.stage:
        if cfg.stage not in STAGE_ALIASES:
            raise ConfigError(f"stage must be one of {STAGES} (deprecated: use recipe), got {cfg.stage!r}")
        if warn:
            warnings.warn(f"`stage: {cfg.stage}` is deprecated; it runs `recipe: {STAGE_ALIASES[cfg.stage]}`, "
                          f"the official recipe", DeprecationWarning, stacklevel=3)
        return STAGE_ALIASES[cfg.stage]
    return "retrieval"


def resolve_recipe(cfg: TrainConfig, warn: bool = True) -> Recipe:
    """The official recipe the config names, with the config's deviations applied."""
    name = recipe_name(cfg, warn)
    if name not in RECIPES:
        raise ConfigError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name].with_options(**{k: getattr(cfg, k) for k in _RECIPE_OPTIONS})


def deviations(cfg: TrainConfig) -> dict[str, Any]:
    """The settings in which this run differs from the official recipe (for the log and state)."""
    official = RECIPES[recipe_name(cfg, warn=False)]
    out = {k: getattr(cfg, k) for k in _RECIPE_OPTIONS
           if getattr(cfg, k) is not None and getattr(cfg, k) != getattr(official, k)}
    if official.rerank_loss and cfg.rerank_weight != 1.0:
        out["rerank_weight"] = cfg.rerank_weight
    if data_kind(official).on_tokens(cfg):
        out["rerank_source"] = "tokens"
    return out


def validate(cfg: TrainConfig) -> Recipe:
    """Clear errors for configs that cannot train, before any worker starts; returns the recipe."""
    recipe = resolve_recipe(cfg, warn=False)
    kind = data_kind(recipe)
    parse_use_gpu(cfg.use_gpu)
    if len(cfg.image_size) != 2 or any(s % 16 for s in cfg.image_size):
        raise ConfigError(f"image_size must be [H, W], multiples of 16, got {cfg.image_size}")
    if recipe.batch_size < cfg.num_workers:
        raise ConfigError(f"batch_size ({recipe.batch_size}) must be at least num_workers ({cfg.num_workers})")
    if cfg.init == "checkpoint" and not cfg.checkpoint and cfg.backbone == "r2former":
        raise ConfigError("backbone r2former with init=checkpoint needs `checkpoint`; "
                          "use init=pretrained (timm DeiT-S) or init=random")
    from ..augment import AUGMENTS
    if cfg.augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {AUGMENTS}, got {cfg.augment!r}")
    if cfg.augment != "none" and not kind.on_tokens(cfg):
        raise ConfigError("augment applies to recipe rerank on stored tokens (rerank_source: tokens) only")
    kind.check(cfg, recipe)
    return recipe
