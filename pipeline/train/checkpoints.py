"""Model files and train state: the start model, what each epoch's checkpoint folder holds, finding
the newest finished checkpoint of a run, and Ray Train's storage for a local path or s3:// URL.

A checkpoint folder (``<output>/<name>/checkpoint_*``, written through Ray Train's storage) holds::

    model.pt              the project's own layout (``model.save_checkpoint(..., layout="project")``)
    model_official.pth    the official release layout, when ``official_layout: true`` (R²Former only)
    train_state.pt        model + optimizer (+ token adapter) state for exact resumption
    r2f_state.json        epoch, step, metrics history, best recall, epochs without improvement, and
                          the size of every file above (a checkpoint cut off mid-upload is ignored)
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from .. import storage
from ..config import ConfigError
from ..log import get_logger

if TYPE_CHECKING:
    from .config import TrainConfig
    from .recipes import Recipe

log = get_logger(__name__)

STATE_FILE = "r2f_state.json"


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


def save_model_files(model, folder: str, official: bool, recipe: Recipe) -> None:
    if recipe.rerank_loss:
        model.has_trained_reranker = True
    model.save_checkpoint(os.path.join(folder, "model.pt"), layout="project")
    if official:
        if type(model).__name__ != "R2Former":
            raise ConfigError("official_layout is only defined for backbone r2former")
        model.save_checkpoint(os.path.join(folder, "model_official.pth"), layout="official")


def write_checkpoint(folder: str, model, adapter, optimizer, state: dict, cfg: TrainConfig, recipe: Recipe) -> None:
    """One epoch's checkpoint files into the local ``folder`` (the layout in the module docstring)."""
    import torch

    from ..model.training import fold_token_adapter

    save_model_files(fold_token_adapter(model, adapter), folder, cfg.official_layout, recipe)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "adapter": adapter.state_dict() if adapter is not None else None},
               os.path.join(folder, "train_state.pt"))
    # File sizes let a reader tell a fully uploaded checkpoint from one cut off mid-copy.
    files = {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump({**state, "files": files}, f)


def load_train_state(folder: str) -> tuple[dict, dict]:
    """``(train_state.pt contents, r2f_state)`` of a local checkpoint folder."""
    import torch

    saved = torch.load(os.path.join(folder, "train_state.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(folder, STATE_FILE)) as f:
        state = json.load(f)
    state.pop("files", None)
    return saved, state


def ray_storage(output: str):
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


def read_state(checkpoint: str) -> dict:
    """The ``r2f_state.json`` of a checkpoint folder (history of per-epoch metrics and step losses)."""
    return storage.read_json(storage.join(checkpoint, STATE_FILE))
