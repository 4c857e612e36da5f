"""Reading and writing R²Former checkpoints: the official release layout and the project's own.

timm-style: ``checkpoint_filter_fn`` turns a foreign state_dict into this model's names, and
``check_keys`` makes any mismatch an error that names the key. Files are read with
``torch.load(weights_only=True)``; the numpy objects the official training script stores
(``recalls``, ``best_r5``) are allow-listed explicitly instead of falling back to full pickle.
"""
from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..log import get_logger

log = get_logger(__name__)

PROJECT_FORMAT = "r2former-pipeline/1"

# Official module name -> ours. The official network is GeoLocalizationNetRerank wrapped in
# DataParallel (hence ``module.``); its reranker attribute is ``Reranker``.
_OFFICIAL_PREFIXES = (("backbone.", "backbone."), ("local_head.", "local_head."), ("Reranker.", "reranker."))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the model; the message names the file and the keys."""


def _numpy_safe_globals() -> list:
    """The globals a pickle of numpy arrays / scalars references (numpy 1.x and 2.x spellings)."""
    found = []
    for mod_name, attr in (("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
                           ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")):
        try:
            mod = __import__(mod_name, fromlist=[attr])
            found.append(getattr(mod, attr))
        except (ImportError, AttributeError):
            pass
    found += [np.ndarray, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType,
              np.dtypes.Int32DType, np.dtypes.BoolDType]
    return found


def load_file(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and numpy scalars/arrays allow-listed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; say which file and why
            raise CheckpointError(f"cannot read checkpoint {path} with weights_only=True: {e}") from e


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_official_layout(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "model_state_dict" in obj


def is_project_layout(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == PROJECT_FORMAT


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Official ``model_state_dict`` -> this model's names; returns ``(state_dict, stage1)``.

    Strips the DataParallel ``module.`` prefix and renames ``Reranker.`` to ``reranker.``.
    ``stage1`` is True for a global-retrieval-only checkpoint (stage 1 of the official training):
    its keys lack the ``backbone.`` level (``module.cls_token`` ...); the official loader renames
    ``module`` to ``module.backbone`` in that case, and so does this function.
    Unknown names are passed through unchanged so that ``check_keys`` reports them.
    """
    sd = {}
    for k, v in state_dict.items():
        sd[k[len("module."):] if k.startswith("module.") else k] = v
    stage1 = "backbone.cls_token" not in sd and "cls_token" in sd
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if stage1:
            k = "backbone." + k
        for src, dst in _OFFICIAL_PREFIXES:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        out[k] = v
    return out, stage1


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This model's names -> the official ``module.``-prefixed names (inverse of the filter)."""
    out = {}
    for k, v in state_dict.items():
        for dst, src in _OFFICIAL_PREFIXES:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        out["module." + k] = v
    return out


def check_keys(model_keys, loaded_keys, source: str, allowed_missing_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Error naming every unexpected key, or any missing key not under ``allowed_missing_prefixes``.
    Returns the (allowed) missing keys."""
    model_keys, loaded_keys = set(model_keys), set(loaded_keys)
    unexpected = sorted(loaded_keys - model_keys)
    missing = sorted(model_keys - loaded_keys)
    bad_missing = [k for k in missing if not k.startswith(allowed_missing_prefixes)]
    if unexpected or bad_missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if bad_missing:
            parts.append(f"missing keys {bad_missing[:10]}{' ...' if len(bad_missing) > 10 else ''}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    return missing


def check_shapes(model_sd: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], source: str) -> None:
    for k, v in loaded.items():
        if k in model_sd and tuple(model_sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(model_sd[k].shape)}")


# ---------------------------------------------------------------------------- writing
def official_checkpoint_dict(official_state_dict: Mapping[str, torch.Tensor], *, epoch: int = 0,
                             recalls: Any = None, best_r5: Any = 0.0, optimizer_state: Any = None) -> dict:
    """The six-entry dict the official ``util.save_checkpoint`` writes."""
    return {
        "epoch_num": int(epoch),
        "model_state_dict": dict(official_state_dict),
        "optimizer_state_dict": optimizer_state if optimizer_state is not None else {"state": {}, "param_groups": []},
        "recalls": recalls if recalls is not None else [0.0, 0.0, 0.0, 0.0],
        "best_r5": best_r5,
        "not_improved_num": 0,
    }


def project_checkpoint_dict(state_dict: Mapping[str, torch.Tensor], config: dict, backbone: str = "r2former",
                            extra: dict | None = None) -> dict:
    """The project layout; only plain Python types and tensors, so ``weights_only=True`` reads it."""
    return {"format": PROJECT_FORMAT, "backbone": backbone, "config": dict(config),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
            **(extra or {})}


# ---------------------------------------------------------------------------- parity weights
def formula_value(key: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The deterministic weights of the shared parity fixtures (README of r2former_official_seed0):
    a key-seeded standard normal, LayerNorm weights 1 + 0.1 z, ``Reranker.ratio`` 0.5, the rest
    0.02 z, rounded through float16."""
    rng = np.random.default_rng(zlib.crc32(key.encode()) + seed)
    base = rng.standard_normal(shape, dtype=np.float32)
    if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "decoder_norm.weight")):
        v = 1 + np.float32(0.1) * base
    elif key == "Reranker.ratio":
        v = np.full(shape, 0.5, dtype=np.float32)
    else:
        v = np.float32(0.02) * base
    return v.astype(np.float16).astype(np.float32)


def read_keys_tsv(path: str | Path) -> list[dict]:
    rows = []
    lines = Path(path).read_text().splitlines()
    for line in lines[1:]:
        if not line.strip():
            continue
        key, shape, rule, total, first3 = line.split("\t")
        rows.append({"key": key, "shape": tuple(int(s) for s in shape.split("x")), "rule": rule,
                     "sum": float(total), "first3": [float(x) for x in first3.split(",")]})
    return rows


def formula_state_dict(keys_tsv: str | Path, seed: int = 0, verify: bool = True,
                       prefix: str = "") -> dict[str, torch.Tensor]:
    """Regenerate the parity fixture's weights (official names, no ``module.``) in keys.tsv order,
    checking each against its recorded sum and first three values; only keys under ``prefix``."""
    out = {}
    for row in read_keys_tsv(keys_tsv):
        if not row["key"].startswith(prefix):
            continue
        v = formula_value(row["key"], row["shape"], seed)
        if verify:
            s = float(v.astype(np.float64).sum())
            if not np.isclose(s, row["sum"], rtol=1e-12, atol=1e-12) or \
                    not np.array_equal(v.reshape(-1)[:3], np.array(row["first3"], dtype=np.float32)):
                raise CheckpointError(f"regenerated {row['key']} does not match {keys_tsv}: sum {s!r} vs {row['sum']!r}")
        out[row["key"]] = torch.from_numpy(v)
    return out
