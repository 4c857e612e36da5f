"""Training: configuration, data, validation, the Ray Train loop, checkpoints and resume, CLI.

``r2f train --recipe rerank|finetune|end_to_end|retrieval --config configs/train_X.yaml`` and
``pipeline.train.run(TrainConfig) -> TrainResult``. Recipes (``recipes.py``) are the official ones;
``--stage retrieval|rerank|finetune`` is a deprecated alias of the recipe of the same name.

Data per recipe
---------------
* ``mining: partial`` (retrieval, finetune, end_to_end): triplets from partial mining
  (``pipeline.mine.PartialMiner``) over dataset images, refreshed every ``cache_queries`` queries.
* ``mining: global`` (rerank): each query with its best positive and ``num_negatives`` negatives
  drawn from its top-``negatives_top`` (100) global hardest negatives (``r2f mine``). The images
  path (default, official) recomputes tokens, so ``local_head`` learns; ``rerank_source: tokens``
  reads them from extraction stores instead (fast, a project deviation: only the reranker and a
  token adapter learn).

Distributed layout
------------------
``TorchTrainer`` with a gloo (CPU) or NCCL (GPU) process group. Every worker derives the same
mining rounds and permutations from ``seed`` and the epoch, so workers agree on the data without
exchanging it; descriptor caches for mining and validation are computed split across workers and
all-gathered. The global batch is the recipe's ``batch_size``; worker r takes items ``r::W`` of it
and ``step.step`` sums the gradients over workers, so the update is the official one on the
global batch (the loss is divided by the global batch, not by a worker's share).

Checkpoints (every epoch, to ``<output>/<name>/checkpoint_*`` through Ray Train's storage, local
or ``s3://``) hold:

    model.pt              the project's own layout (``model.save_checkpoint(..., layout="project")``)
    model_official.pth    the official release layout, when ``official_layout: true`` (R²Former only)
    train_state.pt        model + optimizer (+ token adapter) state for exact resumption
    r2f_state.json        epoch, step, metrics history, best recall, epochs without improvement

A rerun with the same ``output`` and ``name`` resumes from the newest checkpoint. This file is
over 450 lines: it still holds the data sources and validation helpers that issue 23 splits out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .. import storage
from ..config import ConfigError, from_dict, load_config, parse_use_gpu, to_dict
from ..log import get_logger
from ..model import training as mt
from .recipes import RECIPES, STAGE_ALIASES, Recipe, build_optimizer, epoch_lr, set_lr
from .step import Batch, describe, prepare_model, step, triplet_rows

log = get_logger(__name__)

STAGES = ("retrieval", "rerank", "finetune")
STATE_FILE = "r2f_state.json"


# ====================================================================== configuration
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
    if official.name == "rerank" and cfg.rerank_source == "tokens":
        out["rerank_source"] = "tokens"
    return out


@dataclass
class TrainResult:
    checkpoint: str                         # folder or URL of the newest checkpoint
    model_path: str                         # <checkpoint>/model.pt
    metrics: dict[str, Any]
    epochs_run: int
    seconds: float


def validate(cfg: TrainConfig) -> Recipe:
    """Clear errors for configs that cannot train, before any worker starts; returns the recipe."""
    recipe = resolve_recipe(cfg, warn=False)
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
    tokens = recipe.mining == "global" and cfg.rerank_source == "tokens"
    if cfg.augment != "none" and not tokens:
        raise ConfigError("augment applies to recipe rerank on stored tokens (rerank_source: tokens) only")
    if recipe.mining == "global":
        if cfg.rerank_source == "tokens" and recipe.triplet_loss:
            raise ConfigError(f"recipe {recipe.name} has a triplet loss: rerank_source tokens cannot train it")
        need = ["queries_store", "database_store", "hardest_negatives"]
        if cfg.rerank_source == "images":
            need += ["queries", "database"]
        missing = [f"train.{n}" for n in need if not getattr(cfg.train, n)]
        if missing:
            raise ConfigError(f"recipe {recipe.name} needs {', '.join(missing)} (extraction stores and `r2f mine` "
                              f"output{'' if cfg.rerank_source == 'tokens' else ', dataset specs of the images'})")
    else:
        missing = [f"train.{n}" for n in ("queries", "database") if not getattr(cfg.train, n)]
        if missing:
            raise ConfigError(f"recipe {recipe.name} needs {', '.join(missing)} (dataset specs)")
    return recipe


# ====================================================================== model helpers
def build_training_model(cfg: TrainConfig):
    """The start model on CPU (float32); ``cfg.checkpoint`` from any URL (``pipeline.weights``)."""
    from ..weights import build_model

    if cfg.backbone == "r2former":
        from ..model import R2Former
        if cfg.init == "pretrained":
            return R2Former.from_timm_pretrained(**cfg.model)
        if cfg.init == "random":
            return R2Former(**cfg.model)
        return build_model("r2former", cfg.checkpoint, **cfg.model)
    if cfg.backbone == "efficientnet-lite0":
        return build_model("efficientnet-lite0", cfg.checkpoint if cfg.init == "checkpoint" else None, **cfg.model)
    raise ConfigError(f"unknown backbone {cfg.backbone!r}")


def local_projection(model):
    """The module turning backbone features into the 128-d local token features."""
    return mt.local_head(model)


def save_model_files(model, folder: str, official: bool, recipe: Recipe) -> None:
    if recipe.rerank_loss:
        model.has_trained_reranker = True
    model.save_checkpoint(os.path.join(folder, "model.pt"), layout="project")
    if official:
        if type(model).__name__ != "R2Former":
            raise ConfigError("official_layout is only defined for backbone r2former")
        model.save_checkpoint(os.path.join(folder, "model_official.pth"), layout="official")


def token_adapter(model):
    """Identity-initialised Linear on the stored 128-d token features (the stored-token path's
    stand-in for the local projection, see ``fold_adapter``)."""
    import torch

    proj = local_projection(model)
    dim = proj.out_features
    adapter = torch.nn.Linear(dim, dim)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(dim))
        adapter.bias.zero_()
    return adapter


def fold_adapter(model, adapter):
    """A copy of ``model`` whose local projection is ``adapter ∘ projection``: both are linear, so
    the stored-token path trained exactly this projection (W' = A W, b' = A b + c)."""
    import copy

    import torch

    if adapter is None:
        return model
    out = copy.deepcopy(model)
    proj = local_projection(out)
    with torch.no_grad():
        A, c = adapter.weight.detach().cpu(), adapter.bias.detach().cpu()
        W, b = proj.weight.detach().cpu().clone(), proj.bias.detach().cpu().clone()
        proj.weight.copy_(A @ W)
        proj.bias.copy_(A @ b + c)
    return out


# ====================================================================== data helpers (run on workers)
class ImageSource:
    """Decoded, resized images of a dataset table by row, with a small in-memory cache (the
    same images come back at every mining refresh)."""

    def __init__(self, table, image_size: list[int], cache_limit: int = 4096):
        self.paths = table.column("path").to_pylist()
        self.size = (int(image_size[0]), int(image_size[1]))
        self.cache: dict[int, np.ndarray] = {}
        self.cache_limit = cache_limit

    def batch(self, rows) -> "Any":
        import torch

        from ..images import load_image
        from ..model import normalize_images

        pix = []
        for r in np.asarray(rows).reshape(-1):
            r = int(r)
            img = self.cache.get(r)
            if img is None:
                img = load_image(self.paths[r], self.size).pixels
                if len(self.cache) < self.cache_limit:
                    self.cache[r] = img
            pix.append(img)
        return normalize_images(torch.from_numpy(np.stack(pix)))


def dataset_positions(table) -> np.ndarray:
    """(N, 2) positions of a dataset or store table; an image without one is an error (training
    cannot place it)."""
    from ..spatial import positions_of

    return positions_of(table, missing="raise", what="dataset")


def _allgather_rows(local: dict[int, np.ndarray], world: int) -> dict[int, np.ndarray]:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict[int, np.ndarray] = {}
    for p in parts:
        merged.update(p)
    return merged


def describe_rows(model, source: ImageSource, rows: np.ndarray, rank: int, world: int, device, batch: int = 16,
                  ) -> np.ndarray:
    """Global descriptors of ``rows`` (in that order), computed split across workers, in eval mode."""
    import torch

    rows = np.asarray(rows, np.int64)
    uniq = np.unique(rows)
    mine = uniq[rank::world]
    was_training = model.training
    model.eval()
    local: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for s in range(0, len(mine), batch):
            chunk = mine[s:s + batch]
            g = describe(model, source.batch(chunk).to(device)).global_descriptor.float().cpu().numpy()
            local.update({int(r): g[i] for i, r in enumerate(chunk)})
    model.train(was_training)
    merged = _allgather_rows(local, world)
    return np.stack([merged[int(r)] for r in rows]) if len(rows) else np.zeros((0, 1), np.float32)


RECALL_KS = (1, 5, 10, 20)


def recall_at(query_desc: np.ndarray, db_desc: np.ndarray, query_pos: np.ndarray, db_pos: np.ndarray,
              radius: float, ks=RECALL_KS, block: int = 4096) -> dict[str, float]:
    """Recall@k in percent: a query is found at k when one of its k nearest descriptors lies within
    ``radius`` of it. FAISS top-``max(ks)`` search (exact, GPU where present) in query blocks:
    memory is the index (database x D float32) plus block x k, never queries x database."""
    import faiss

    from ..index.choose import to_device
    from ..spatial import geo_within

    q = np.ascontiguousarray(query_desc, dtype=np.float32)
    db = np.ascontiguousarray(db_desc, dtype=np.float32)
    k = min(max(ks), len(db))
    first_hit = np.full(len(q), k, np.int64)   # rank of the first correct image (k = none in the top k)
    if len(q) and k:
        index = faiss.IndexFlatL2(db.shape[1])
        index.add(db)
        index = to_device(index)
        for s in range(0, len(q), block):
            _, rows = index.search(q[s:s + block], k)
            hit = geo_within(query_pos[s:s + block], db_pos[np.maximum(rows, 0)], radius) & (rows >= 0)
            first_hit[s:s + block] = np.where(hit.any(1), hit.argmax(1), k)
    if not len(q):
        return {f"recall@{n}": float("nan") for n in ks}
    return {f"recall@{n}": float(100.0 * (first_hit < n).mean()) for n in ks}


def nearest_rows(query_desc: np.ndarray, db_desc: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """(Q, k) database rows nearest each query (exact FAISS search in query blocks; memory: the
    index plus block x k)."""
    import faiss

    from ..index.choose import to_device

    db = np.ascontiguousarray(db_desc, dtype=np.float32)
    index = faiss.IndexFlatL2(db.shape[1])
    index.add(db)
    index = to_device(index)
    q = np.ascontiguousarray(query_desc, dtype=np.float32)
    return np.concatenate([index.search(q[s:s + block], k)[1] for s in range(0, len(q), block)]) \
        if len(q) else np.zeros((0, k), np.int64)


def best_positives(query_desc: np.ndarray, db_desc: np.ndarray, positives, chunk_pairs: int = 1 << 20,
                   ) -> np.ndarray:
    """(Q,) the database row among each query's ``positives`` (``spatial.Neighbours``) nearest in
    descriptor space, -1 where a query has none. Vectorised over (query, positive) pairs in
    chunks: memory O(chunk_pairs x D)."""
    counts = positives.counts
    pair_q = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    d = np.empty(len(pair_q), np.float32)
    for s in range(0, len(pair_q), chunk_pairs):
        e = s + chunk_pairs
        d[s:e] = ((db_desc[positives.rows[s:e]] - query_desc[pair_q[s:e]]) ** 2).sum(-1)
    order = np.lexsort((d, pair_q))       # by query, then distance: each query's first pair is its best
    out = np.full(len(counts), -1, np.int64)
    has = counts > 0
    out[has] = positives.rows[order[positives.offsets[:-1][has]]]
    return out


# ====================================================================== workers
class _Step:
    """The model (and the token adapter) as one module with a mode argument, for validation and
    benchmarks: ``"global"`` images -> global descriptors, ``"rerank_tokens"`` (query tokens,
    candidate tokens) -> logits. Training steps go through ``step.step``."""

    @staticmethod
    def module(model, adapter=None):
        import torch

        from .step import adapt_tokens

        class StepModule(torch.nn.Module):
            def __init__(self, m, adapter):
                super().__init__()
                self.model = m
                self.adapter = adapter

            def forward(self, mode: str, a, b=None):
                if mode == "global":
                    return describe(self.model, a).global_descriptor
                if mode == "rerank_tokens":
                    return mt.reranker(self.model)(adapt_tokens(a, self.adapter), adapt_tokens(b, self.adapter))
                raise ValueError(f"unknown mode {mode!r}")

        return StepModule(model, adapter)


def _triplet_loss(q, p, n, margin: float):
    """Mean over triplets and negatives of max(0, |q-p| - |q-n| + margin): the official loss's
    triplet part for a (B, K) batch, as a held-out measure (training uses ``step.losses``)."""
    import torch.nn.functional as F

    B, K, D = n.shape
    return F.triplet_margin_loss(q.unsqueeze(1).expand(-1, K, -1).reshape(-1, D),
                                 p.unsqueeze(1).expand(-1, K, -1).reshape(-1, D), n.reshape(-1, D), margin=margin)


def _train_loop(loop_config: dict) -> None:
    """The per-worker training function handed to TorchTrainer. Each step is ``step.step`` on
    this worker's share of the global batch; gradients are summed over workers inside it."""
    import torch
    import torch.distributed as dist
    import ray.train
    import ray.train.torch

    from ..device import set_cpu_threads
    from ..log import setup_logging

    setup_logging()
    cfg = from_dict(TrainConfig, loop_config["config"])
    recipe = resolve_recipe(cfg, warn=False)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_cpu_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()

    model = build_training_model(cfg)
    tokens = recipe.mining == "global" and cfg.rerank_source == "tokens"
    trainable = prepare_model(model, recipe, cfg.rerank_source if tokens else "images", cfg.freeze_batchnorm)
    adapter = token_adapter(model) if (tokens and cfg.token_adapter) else None
    params = [p for p in model.parameters() if p.requires_grad]
    if adapter is not None:
        params += list(adapter.parameters())
    optimizer = build_optimizer(params, recipe)

    state = {"epoch": 0, "step": 0, "history": [], "best_recall@5": -1.0, "not_improved": 0, "stopped": False}
    # Ray hands back the newest checkpoint of this run after a worker failure; a new driver resumes
    # from the one ``run`` found in storage (V2 dropped ``resume_from_checkpoint``).
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and loop_config.get("resume"):
        path, fs = _ray_storage(loop_config["resume"])
        ckpt = ray.train.Checkpoint(path, filesystem=fs)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)
            state.pop("files", None)
        model.load_state_dict(saved["model"])
        if adapter is not None and saved.get("adapter") is not None:
            adapter.load_state_dict(saved["adapter"])
        optimizer.load_state_dict(saved["optimizer"])
        log.info("rank %d resumed from epoch %d (step %d)", rank, state["epoch"], state["step"])

    model.to(device)
    if adapter is not None:
        adapter.to(device)
    runner = _StageRunner(cfg, recipe, model, adapter, optimizer, rank, world, device)
    if rank == 0:
        log.info("recipe %s (%s): %d trainable tensors, %s, start epoch %d, deviations %s", recipe.name,
                 recipe.source, len(trainable), mt.freeze_state(model), state["epoch"], deviations(cfg) or "none")

    while state["epoch"] < recipe.epochs and not state["stopped"]:
        epoch = state["epoch"]
        t0 = time.perf_counter()
        lr = epoch_lr(recipe, epoch)     # per epoch, as the official adjust_learning_rate
        set_lr(optimizer, lr)
        losses = runner.epoch(epoch)
        val = runner.validate()
        state["step"] += len(losses)
        state["epoch"] = epoch + 1
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": state["step"], "recipe": recipe.name, "lr": lr,
                                   "loss": float(np.mean(losses)) if losses else float("nan"),
                                   "step_losses": [float(x) for x in losses],
                                   "epoch_seconds": time.perf_counter() - t0}
        metrics.update({f"val_{k}": v for k, v in val.items()})
        if "recall@5" in val:
            if val["recall@5"] > state["best_recall@5"]:
                state["best_recall@5"], state["not_improved"] = val["recall@5"], 0
            else:
                state["not_improved"] += 1
            state["stopped"] = state["not_improved"] >= recipe.patience
        metrics["best_recall@5"] = state["best_recall@5"]
        metrics["stopped_early"] = state["stopped"]
        state["history"].append({k: v for k, v in metrics.items() if k != "step_losses"} | {"step_losses": metrics["step_losses"]})
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_model_files(fold_adapter(model, adapter), d, cfg.official_layout, recipe)
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "adapter": adapter.state_dict() if adapter is not None else None},
                           os.path.join(d, "train_state.pt"))
                # File sizes let a reader tell a fully uploaded checkpoint from one cut off mid-copy.
                files = {n: os.path.getsize(os.path.join(d, n)) for n in sorted(os.listdir(d))}
                with open(os.path.join(d, STATE_FILE), "w") as f:
                    json.dump({**state, "files": files}, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)
        log.info("epoch %d: lr %.3g loss %.4f %s", epoch + 1, lr, metrics["loss"],
                 {k: round(v, 2) for k, v in val.items()})
    if dist.is_initialized():
        dist.barrier()


class _StageRunner:
    """The data of one recipe on one worker: each step's share of the global batch, in the
    official layout (``step.triplet_rows``), handed to ``step.step``."""

    def __init__(self, cfg: TrainConfig, recipe: Recipe, model, adapter, optimizer, rank: int, world: int, device):
        self.cfg, self.recipe, self.model, self.adapter, self.optimizer = cfg, recipe, model, adapter, optimizer
        self.rank, self.world, self.device = rank, world, device
        self.tokens = recipe.mining == "global" and cfg.rerank_source == "tokens"
        self.step_module = _Step.module(model, adapter)
        if recipe.mining == "global":
            self._init_rerank()
        else:
            self._init_triplets()
        self._init_val()

    def _set_train_mode(self) -> None:
        mt.set_modes(self.model, self.recipe.train_mode, freeze_batchnorm=self.cfg.freeze_batchnorm)
        if self.adapter is not None:
            self.adapter.train()

    def _step(self, batch: Batch) -> float:
        """One step; returns the global batch's loss (the workers' shares summed)."""
        import torch
        import torch.distributed as dist

        out = step(self.model, batch, self.recipe, self.optimizer, adapter=self.adapter,
                   rerank_weight=self.cfg.rerank_weight)
        value = torch.tensor([out.loss], dtype=torch.float64)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(value)
        return float(value)

    def _capped(self, n: int) -> bool:
        return bool(self.cfg.max_steps_per_epoch) and n >= self.cfg.max_steps_per_epoch

    # ------------------------------------------------------------------ partial mining (triplets of images)
    def _init_triplets(self) -> None:
        from ..datasets import load_dataset
        from ..mine import PartialMiner

        cfg = self.cfg
        q, db = load_dataset(cfg.train.queries), load_dataset(cfg.train.database)
        self.q_src, self.db_src = ImageSource(q, cfg.image_size), ImageSource(db, cfg.image_size)
        self.miner = PartialMiner(dataset_positions(q), dataset_positions(db), positive_radius=cfg.positive_radius,
                                  negative_radius=cfg.negative_radius, cache_queries=cfg.cache_queries,
                                  database_subset=cfg.database_subset, num_negatives=self.recipe.num_negatives,
                                  seed=cfg.seed)

    def _images(self, qi: np.ndarray, pi: np.ndarray, ni: np.ndarray):
        """Images of items (query, positive, negatives...) in the official collate order."""
        import torch

        b, K = len(qi), ni.shape[1]
        q, p, n = self.q_src.batch(qi), self.db_src.batch(pi), self.db_src.batch(ni.reshape(-1))
        items = torch.cat([q[:, None], p[:, None], n.view(b, K, *n.shape[1:])], dim=1)
        return items.reshape(b * (2 + K), *q.shape[1:]).to(self.device)

    def _triplet_epoch(self, epoch: int) -> list[float]:
        import torch

        cfg, B = self.cfg, self.recipe.batch_size
        losses: list[float] = []
        refreshes = max(1, math.ceil(min(cfg.queries_per_epoch, len(self.miner.trainable_queries)) / cfg.cache_queries))
        for r in range(refreshes):
            round_ = self.miner.sample(epoch * 1000 + r)
            qd = describe_rows(self.model, self.q_src, round_.queries, self.rank, self.world, self.device)
            dd = describe_rows(self.model, self.db_src, round_.database, self.rank, self.world, self.device)
            trip = self.miner.triplets(round_, qd, dd)
            order = np.random.default_rng([cfg.seed, epoch, r]).permutation(len(trip.queries))
            steps = len(order) // B
            self._set_train_mode()
            for s in [s for _ in range(cfg.cache_passes) for s in range(steps)]:
                if self._capped(len(losses)):
                    break
                idx = order[s * B:(s + 1) * B][self.rank::self.world]
                ni = trip.negatives[idx]
                batch = Batch(triplets=torch.from_numpy(triplet_rows(len(idx), ni.shape[1])).to(self.device),
                              global_batch=B, images=self._images(trip.queries[idx], trip.positives[idx], ni))
                losses.append(self._step(batch))
            if self._capped(len(losses)):
                break
        return losses

    # ------------------------------------------------------------------ global hardest negatives (rerank)
    def _init_rerank(self) -> None:
        """Training items as arrays: query row, best positive row, negative pool (rows, nearest
        first, -1 padded). Memory O(queries x negatives_top), no Python object per query."""
        from ..mine import read_hardest_negatives
        from ..spatial import PositionIndex

        cfg = self.cfg
        cols = ["image_id", "row", "utm_east", "utm_north", "global_descriptor"]
        q = storage.read_global_table(cfg.train.queries_store, cols)
        db = storage.read_global_table(cfg.train.database_store, cols)
        self.q_rows = q.column("row").to_numpy().astype(np.int64)
        self.db_rows = db.column("row").to_numpy().astype(np.int64)
        q_ids = q.column("image_id").to_numpy().astype(np.int64)
        db_ids = db.column("image_id").to_numpy().astype(np.int64)
        q_desc, db_desc = storage.descriptors_of(q), storage.descriptors_of(db)
        hard = PositionIndex(dataset_positions(db)).pairs_within(dataset_positions(q), cfg.positive_radius)
        best = best_positives(q_desc, db_desc, hard)
        negatives = read_hardest_negatives(cfg.train.hardest_negatives, top=cfg.negatives_top)
        mined = negatives.rows_of(q_ids)
        neg_ids = np.where(mined[:, None] >= 0, negatives.negatives[np.maximum(mined, 0)], -1)
        # Negative image ids -> database table rows (ids outside this database are dropped).
        by_id = np.argsort(db_ids, kind="stable")
        at = np.clip(np.searchsorted(db_ids[by_id], neg_ids), 0, len(db_ids) - 1)
        pool = np.where((neg_ids >= 0) & (db_ids[by_id][at] == neg_ids), by_id[at], -1)
        pool = np.take_along_axis(pool, np.argsort(pool < 0, axis=1, kind="stable"), 1)  # valid first
        pool_len = (pool >= 0).sum(1)
        keep = np.flatnonzero((best >= 0) & (pool_len > 0))
        self.item_q, self.item_pos = keep, best[keep]
        self.item_pool, self.item_pool_len = pool[keep], pool_len[keep]
        if not len(keep):
            raise ValueError("rerank training found no query with both a positive and hardest negatives; "
                             "check positive_radius and the `r2f mine` output")
        self.num_items = len(keep)
        self.steps_per_epoch = max(1, self.num_items // self.recipe.batch_size)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        if self.tokens:
            self.q_tokens = _TokenSource(cfg.train.queries_store, self.q_rows)
            self.db_tokens = _TokenSource(cfg.train.database_store, self.db_rows)
        else:
            from ..datasets import load_dataset
            qt, dbt = load_dataset(cfg.train.queries), load_dataset(cfg.train.database)
            self.q_src = ImageSource(_align(qt, q_ids, cfg.train.queries), cfg.image_size)
            self.db_src = ImageSource(_align(dbt, db_ids, cfg.train.database), cfg.image_size)

    def _item_tokens(self, qi: np.ndarray, pi: np.ndarray, ni: np.ndarray, epoch: int, s: int):
        """Stored tokens of items (query, positive, negatives...) in the official collate order."""
        import torch

        cfg = self.cfg
        b, K = len(qi), ni.shape[1]
        c_np = self.db_tokens.get(np.concatenate([pi, ni.reshape(-1)]))
        if cfg.augment != "none":
            from ..augment import augment_candidates
            c_np = augment_candidates(c_np, cfg.augment, cfg.augment_scale,
                                      np.random.default_rng([cfg.seed, epoch, s, self.rank]),
                                      aspect=cfg.image_size[0] / cfg.image_size[1])
        q = self.q_tokens.get(qi)
        items = np.concatenate([q[:, None], c_np[:b, None], c_np[b:].reshape(b, K, *c_np.shape[1:])], axis=1)
        return torch.from_numpy(items.reshape(b * (2 + K), *q.shape[1:])).to(self.device)

    def _rerank_epoch(self, epoch: int) -> list[float]:
        import torch

        cfg, B, K = self.cfg, self.recipe.batch_size, self.recipe.num_negatives
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(self.num_items)
        neg_pick = rng.integers(0, 1 << 30, (self.num_items, K))   # negatives drawn from each query's pool
        self._set_train_mode()
        losses = []
        for s in range(self.steps_per_epoch):
            idx = order[s * B:(s + 1) * B][self.rank::self.world]
            qi, pi = self.item_q[idx], self.item_pos[idx]
            ni = self.item_pool[idx[:, None], neg_pick[idx] % self.item_pool_len[idx, None]]
            triplets = torch.from_numpy(triplet_rows(len(idx), K)).to(self.device)
            if self.tokens:
                batch = Batch(triplets=triplets, global_batch=B, tokens=self._item_tokens(qi, pi, ni, epoch, s))
            else:
                batch = Batch(triplets=triplets, global_batch=B, images=self._images(qi, pi, ni))
            losses.append(self._step(batch))
        return losses

    def epoch(self, epoch: int) -> list[float]:
        return self._rerank_epoch(epoch) if self.recipe.mining == "global" else self._triplet_epoch(epoch)

    # ------------------------------------------------------------------ validation
    def _init_val(self) -> None:
        self.val = None
        v = self.cfg.val
        if self.recipe.mining == "global":
            if v.queries_store and v.database_store:
                self.val = "tokens"
        elif v.queries and v.database:
            from ..datasets import load_dataset
            q, db = load_dataset(v.queries), load_dataset(v.database)
            self.val_q, self.val_db = ImageSource(q, self.cfg.image_size), ImageSource(db, self.cfg.image_size)
            self.val_q_pos, self.val_db_pos = dataset_positions(q), dataset_positions(db)
            self.val = "images"

    def validate(self) -> dict[str, float]:
        if self.val == "images":
            qd = describe_rows(self.model, self.val_q, np.arange(len(self.val_q.paths)), self.rank, self.world, self.device)
            dd = describe_rows(self.model, self.val_db, np.arange(len(self.val_db.paths)), self.rank, self.world,
                               self.device)
            return recall_at(qd, dd, self.val_q_pos, self.val_db_pos, self.cfg.val_radius)
        if self.val == "tokens":
            return self._validate_rerank()
        return {}

    def _validate_rerank(self) -> dict[str, float]:
        """Recall@k after reranking the global top ``val_candidates`` with the current reranker
        (``rerank_recall_at``: tokens streamed per query batch)."""
        cfg = self.cfg
        self.model.eval()
        self.step_module.eval()
        return rerank_recall_at(lambda q, c: self.step_module("rerank_tokens", q, c), cfg.val.queries_store,
                                cfg.val.database_store, cfg.val_radius, cfg.val_candidates,
                                rank=self.rank, world=self.world, device=self.device)


def rerank_recall_at(logits_of, queries_store: str, database_store: str, radius: float, candidates: int = 20, *,
                     rank: int = 0, world: int = 1, query_batch: int = 8, device="cpu",
                     ks=RECALL_KS) -> dict[str, float]:
    """Recall@k in percent after reranking each query's global top ``candidates`` by
    ``logits_of(query_tokens (P, T, 131), candidate_tokens (P, T, 131)) -> (P, 2)`` (match score
    ``softmax[:, 1]``). Rank ``rank`` of ``world`` scores queries ``rank::world``; the orders are
    all-gathered, so every rank returns the same figures.

    Dataflow::

        validation stores' global tables (row, UTM, global_descriptor)
            ──► FAISS top-``candidates`` of every query (``nearest_rows``, exact, in query blocks)
        this rank's queries, ``query_batch`` at a time:
            Zarr read of the batch's query tokens and its candidates' tokens (each distinct row once)
            ──► logits_of ──► the batch's candidates reordered by score
        all-gather of the (queries, candidates) orders ──► positions of the reordered lists ──► recall@k

    Memory per process: the two global tables and the FAISS index (N x D float32), the
    (Q, candidates) rows, and ONE batch of token pairs, query_batch x candidates x 2 x T x 131
    float32 (8 x 20 x 2 x 500 x 131 x 4 B = 84 MB at T = 500; the reranker's activations
    besides): never the stores' tokens, so it does not grow with the validation database."""
    import torch

    from ..spatial import geo_within

    cols = ["row", "utm_east", "utm_north", "global_descriptor"]
    q = storage.read_global_table(queries_store, cols)
    db = storage.read_global_table(database_store, cols)
    q_pos, db_pos = dataset_positions(q), dataset_positions(db)
    k = min(candidates, db.num_rows)
    cand = nearest_rows(storage.descriptors_of(q), storage.descriptors_of(db), k)
    q_zarr, db_zarr = q.column("row").to_numpy().astype(np.int64), db.column("row").to_numpy().astype(np.int64)
    del q, db   # only rows and positions are needed from here on
    q_tokens, db_tokens = storage.open_local_tokens(queries_store), storage.open_local_tokens(database_store)
    mine = np.arange(len(cand))[rank::world]
    order = np.empty((len(mine), k), np.int64)
    with torch.no_grad():
        for s in range(0, len(mine), query_batch):
            qi = mine[s:s + query_batch]
            c = cand[qi]                                    # (b, k) database table rows
            qt = torch.from_numpy(storage.read_local_tokens(queries_store, q_zarr[qi], q_tokens))
            ct = torch.from_numpy(storage.read_local_tokens(database_store, db_zarr[c.reshape(-1)], db_tokens))
            qt = qt.to(device).repeat_interleave(k, dim=0)  # pair p = (query p // k, its candidate p % k)
            score = logits_of(qt, ct.to(device)).float().softmax(1)[:, 1].cpu().numpy().reshape(len(qi), k)
            order[s:s + len(qi)] = np.take_along_axis(c, np.argsort(-score, axis=1, kind="stable"), 1)
    gathered = _allgather_rows({rank: np.column_stack([mine, order])}, world)
    merged = np.concatenate([gathered[r] for r in sorted(gathered)])
    reranked = np.empty((len(cand), k), np.int64)
    reranked[merged[:, 0]] = merged[:, 1:]
    if not len(reranked) or not k:
        return {f"recall@{n}": float("nan") for n in ks if n <= k}
    hits = geo_within(q_pos, db_pos[reranked], radius)
    return {f"recall@{n}": float(100.0 * hits[:, :n].any(1).mean()) for n in ks if n <= k}


class _TokenSource:
    """Local tokens of a store by table row (rerank training): a store whose tokens fit in
    ``preload_bytes`` as float32 is read once, a bigger one per batch (memory: one batch)."""

    def __init__(self, store: str, zarr_rows: np.ndarray, preload_bytes: int = 512 << 20):
        self.store, self.zarr_rows = store, np.asarray(zarr_rows, np.int64)
        self.array = storage.open_local_tokens(store)
        size = len(self.zarr_rows) * self.array.shape[1] * self.array.shape[2] * 4
        self.all = storage.read_local_tokens(store, self.zarr_rows, self.array) if size <= preload_bytes else None

    def get(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if self.all is not None:
            return self.all[rows]
        return storage.read_local_tokens(self.store, self.zarr_rows[rows], self.array)


def _align(dataset_table, image_ids: np.ndarray, spec: str):
    """Dataset rows in the order of a store's ``image_ids`` (stores may be sorted differently)."""
    ids = dataset_table.column("image_id").to_numpy()
    where = {int(i): r for r, i in enumerate(ids)}
    missing = [int(i) for i in image_ids if int(i) not in where]
    if missing:
        raise ValueError(f"dataset {spec} lacks {len(missing)} image(s) of the extraction store (first id {missing[0]})")
    return dataset_table.take(np.array([where[int(i)] for i in image_ids]))


# ====================================================================== driver
def _ray_storage(output: str):
    """``(storage_path, pyarrow filesystem or None)`` for Ray Train from a local path or s3:// URL."""
    if output.startswith("s3://"):
        import pyarrow.fs as pafs

        endpoint = storage.storage_options(output).get("endpoint_url")
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        retries = storage.s3_retry_settings()
        strategy = pafs.AwsDefaultS3RetryStrategy if retries["mode"] == "legacy" else pafs.AwsStandardS3RetryStrategy
        kwargs["retry_strategy"] = strategy(max_attempts=retries["max_attempts"])
        return output[len("s3://"):], pafs.S3FileSystem(**kwargs)
    path = os.path.abspath(output)
    return path, None


def latest_checkpoint(output: str, name: str) -> tuple[str | None, dict | None]:
    """``(folder or URL, r2f_state)`` of the newest finished checkpoint of run ``name``, or Nones."""
    run_dir = storage.join(output if output.startswith("s3://") else os.path.abspath(output), name)
    fs, path = storage.filesystem(run_dir)
    if not fs.exists(path):
        return None, None
    best: tuple[int, str, dict] | None = None
    for entry in fs.ls(path, detail=False):
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        if not base.startswith("checkpoint_") or not fs.exists(entry.rstrip("/") + "/" + STATE_FILE):
            continue
        folder = entry.rstrip("/")
        try:
            with fs.open(folder + "/" + STATE_FILE, "rb") as f:
                state = json.loads(f.read())
            complete = all(fs.size(f"{folder}/{n}") == size for n, size in state.get("files", {}).items())
        except (ValueError, FileNotFoundError, OSError):
            complete = False
        if not complete:
            log.warning("ignoring incomplete checkpoint %s (cut off while being written)", folder)
            continue
        if best is None or state["epoch"] > best[0]:
            url = f"s3://{entry}" if run_dir.startswith("s3://") and not entry.startswith("s3://") else entry
            best = (state["epoch"], url, state)
    return (best[1], best[2]) if best else (None, None)


def run(config: TrainConfig) -> TrainResult:
    """Train one recipe (see the module docstring). Resumes from ``<output>/<name>`` when it holds a
    checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..cluster import cluster_gpus, ensure_ray

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
    storage_path, fs = _ray_storage(config.output)
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
        _train_loop,
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


def read_state(checkpoint: str) -> dict:
    """The ``r2f_state.json`` of a checkpoint folder (history of per-epoch metrics and step losses)."""
    return storage.read_json(storage.join(checkpoint, STATE_FILE))


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
