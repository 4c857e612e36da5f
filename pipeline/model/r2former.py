"""R²Former (Zhu et al., CVPR 2023) as the official release computes it, in pure PyTorch.

An image becomes a 256-d ``global_descriptor`` (DeiT-S distilled, final norm, mean of the cls and
dist heads, L2-normalised) and ``local_tokens`` (B, T, 131): the T = min(num_local, patches)
patches that the last block's cls + dist attention ranks highest, each with x, y, normalised
attention and a 128-d ``local_head`` feature of the last block's input. A pair of token sets
becomes two logits through the ``RerankTransformer``.

Checkpoint fidelity notes (see docs/model.md):
- the official gather indexes the whole token sequence with the patch index, so token r takes
  sequence entry p (= patch p-2, cls/dist for p < 2) while x, y, attention describe patch p. The
  released weights were trained with it, so it is the default; ``corrected_gather=True`` gathers
  patch p (for new training).
- another input size than the checkpoint's grid adapts the positional embedding the official way
  (centred crop or bicubic resize with spread rescaling, then a centred band), not timm's resample.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..device import DevicePlan, autocast
from ..log import get_logger
from . import checkpoint as ckpt
from .features import Features
from .reranker import RerankTransformer

log = get_logger(__name__)

PATCH = 16
TIMM_ARCH = "deit_small_distilled_patch16_224"


@dataclass
class R2FormerConfig:
    img_size: tuple[int, int] = (480, 640)      # H x W of the positional-embedding grid (30 x 40)
    global_dim: int = 256
    num_local: int = 500
    local_dim: int = 128
    corrected_gather: bool = False
    # Official ``--finetune``: when False the local head sees a detached block input, so the
    # backbone only learns from the global loss.
    local_grad_to_backbone: bool = False
    reranker: dict = field(default_factory=dict)   # RerankTransformer keyword overrides

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> R2FormerConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ckpt.CheckpointError(f"unknown R2Former config keys {unknown}")
        if "img_size" in known:
            known["img_size"] = tuple(int(s) for s in known["img_size"])
        return cls(**known)


def adapt_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """The official positional embedding for an h x w patch grid from one stored for ``grid``.

    (1, 2 + gh*gw, C) -> (1, 2 + h*w, C). Same as ``forward_deit`` of the release: an n x n map
    (n = max(h, w)) by centred crop when the stored grid is large enough, else bicubic resize
    rescaled about its centre to keep the spread, then the centred band of the short side.
    """
    gh, gw = grid
    if (h, w) == (gh, gw):
        return pos_embed
    C = pos_embed.shape[-1]
    matrix = pos_embed[:, 2:].reshape(1, gh, gw, C).permute(0, 3, 1, 2)
    n = max(h, w)
    if gh >= n and gw >= n:
        r0, c0 = gh // 2 - n // 2, gw // 2 - n // 2
        square = matrix[:, :, r0:r0 + n, c0:c0 + n]
    else:
        square = F.interpolate(matrix, size=(n, n), mode="bicubic")
        d_old = ((matrix[:, :, 0, gw // 2] - matrix[:, :, gh // 2, gw // 2]) ** 2).sum(dim=1)
        d_new = ((square[:, :, n // 2 - gh // 2, n // 2] - square[:, :, n // 2, n // 2]) ** 2).sum(dim=1)
        centre = square[:, :, n // 2, n // 2].unsqueeze(2).unsqueeze(3)
        square = (square - centre) * torch.sqrt(d_old / d_new) + centre
    if h >= w:
        band = square[:, :, :, n // 2 - w // 2:n // 2 - w // 2 + w]
    else:
        band = square[:, :, n // 2 - h // 2:n // 2 - h // 2 + h, :]
    band = band.permute(0, 2, 3, 1).reshape(1, -1, C)
    return torch.cat([pos_embed[:, :2], band], dim=1)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_weights_file() -> str:
    """The ImageNet DeiT-S distilled weights file: the Hugging Face cache, else a download.

    Probes the hub first: without network, hub clients retry for about a minute before failing.
    """
    import timm
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    repo = timm.models.get_pretrained_cfg(TIMM_ARCH).hf_hub_id
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    for name in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(cached, str):
            return cached
    if not _hub_reachable():
        raise RuntimeError(f"the timm weights of {TIMM_ARCH} ({repo}) are not in the Hugging Face cache and "
                           f"huggingface.co is unreachable; pass the path of a timm-layout weights file "
                           f"(R2Former.from_timm_pretrained(path))")
    return hf_hub_download(repo, "model.safetensors", cache_dir=cache_dir)


def _pos_grid_size(num_patches: int, input_size, source: str) -> tuple[int, int]:
    """The training image size behind a stored ``pos_embed`` of ``num_patches`` patches.

    The count alone does not fix the aspect, so the release's 480 x 640 is tried first, then
    ``input_size``; the input size itself does not have to match (see ``adapt_pos_embed``)."""
    for size in (R2FormerConfig.img_size, input_size):
        if size is not None and (size[0] // PATCH) * (size[1] // PATCH) == num_patches:
            return tuple(int(s) for s in size)
    raise ckpt.CheckpointError(f"{source}: backbone.pos_embed holds {num_patches} patches, which is neither "
                               f"480 x 640 nor the given img_size {input_size}; pass img_size=(H, W) of the "
                               f"training resolution")


def _build_deit(img_size: tuple[int, int], num_classes: int, init_weights: bool = True) -> nn.Module:
    import timm
    # Architecture only: weights come from a checkpoint (no download here). timm's ViT init costs
    # seconds; loaders that overwrite every backbone weight skip it.
    return timm.create_model(TIMM_ARCH, pretrained=False, img_size=tuple(img_size), num_classes=num_classes,
                             **({} if init_weights else {"weight_init": "skip"}))


class R2Former(nn.Module):
    """R²Former: ``extract(images) -> Features`` and ``rerank_logits(q, c) -> (P, 2)``.

    Build with ``from_official_checkpoint``, ``load`` or ``from_timm_pretrained``; the plain
    constructor gives randomly initialised weights (``has_trained_reranker`` False).
    """

    def __init__(self, config: R2FormerConfig | None = None, *, init_weights: bool = True, **overrides: Any):
        super().__init__()
        if config is None:
            config = R2FormerConfig(**overrides)
        elif overrides:
            config = R2FormerConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        H, W = config.img_size
        if H % PATCH or W % PATCH:
            raise ValueError(f"img_size must be multiples of {PATCH}, got {config.img_size}")
        self.grid = (H // PATCH, W // PATCH)
        self.backbone = _build_deit(config.img_size, config.global_dim, init_weights)
        self.local_head = nn.Linear(self.backbone.embed_dim, config.local_dim)
        nn.init.normal_(self.local_head.weight, std=0.01)
        nn.init.zeros_(self.local_head.bias)
        rr = {"num_local": config.num_local, "token_dim": 3 + config.local_dim, **config.reranker}
        self.reranker = RerankTransformer(**rr)
        self.has_trained_reranker = False
        self.plan = DevicePlan(torch.device("cpu"), None)
        self.info: dict[str, Any] = {"backbone": "r2former", "checkpoint": None, "checkpoint_sha256": None,
                                     "image_size": list(config.img_size), "num_tokens": config.num_local,
                                     "gather": "corrected" if config.corrected_gather else "official"}

    # ------------------------------------------------------------------ device
    def place(self, plan: DevicePlan) -> R2Former:
        """Move to ``plan.device``; ``extract`` then autocasts as the plan says (bf16 on CUDA)."""
        self.plan = plan
        return self.to(plan.device)

    @property
    def device(self) -> torch.device:
        """Where the parameters are: inputs go there, whatever moved the model (``place`` or ``.to``)."""
        return self.local_head.weight.device

    def _run_plan(self) -> DevicePlan:
        """The placement plan if the model is still where it put it, else plain float32 where the
        parameters are (a model moved with ``.to`` never sends inputs to the plan's old device)."""
        if self.plan.device.type == self.device.type:
            return self.plan
        return DevicePlan(self.device, None)

    # ------------------------------------------------------------------ backbone
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % PATCH or images.shape[3] % PATCH:
            raise ValueError(f"image height and width must be multiples of {PATCH}, got "
                             f"{images.shape[2]} x {images.shape[3]}")

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable forward. Returns ``global_descriptor`` (B, 256), ``local_tokens``
        (B, T, 131), ``attn_map`` (B, patches), ``order`` (B, T) patch indices and
        ``block_input`` (B, 2 + patches, 384), the last block's input."""
        self._check_images(images)
        bb = self.backbone
        B, _, H, W = images.shape
        h, w = H // PATCH, W // PATCH
        # AnySizePatchEmbed of the release: the conv and flatten, no image-size assertion.
        x = bb.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = bb.patch_embed.norm(x)
        x = torch.cat([bb.cls_token.expand(B, -1, -1), bb.dist_token.expand(B, -1, -1), x], dim=1)
        x = bb.pos_drop(x + adapt_pos_embed(bb.pos_embed, self.grid, h, w))
        for blk in bb.blocks[:-1]:
            x = blk(x)
        block_input = x
        x, attn_map = self._last_block(bb.blocks[-1], x)
        x = bb.norm(x)
        global_descriptor = F.normalize((bb.head(x[:, 0]) + bb.head_dist(x[:, 1])) / 2, p=2, dim=1)

        T = min(self.config.num_local, h * w)
        att, order = attn_map.topk(T, dim=1)          # sorted, descending: the official argsort's head
        seq_index = order + 2 if self.config.corrected_gather else order   # see module docstring
        src = block_input if self.config.local_grad_to_backbone else block_input.detach()
        picked = torch.gather(src, 1, seq_index.unsqueeze(2).expand(-1, -1, src.shape[2]))
        # float32 whatever the autocast: x, y and attention in bf16 would lose their resolution
        feats = self.local_head(picked).float()
        side = float(max(H, W))
        xy = torch.stack([((order % w) * PATCH + PATCH // 2).float() / side,
                          ((order // w) * PATCH + PATCH // 2).float() / side], dim=2)
        att = (att / att.max(dim=1, keepdim=True).values).unsqueeze(2)
        local_tokens = torch.cat([xy, att, feats], dim=2)
        return {"global_descriptor": global_descriptor, "local_tokens": local_tokens, "attn_map": attn_map,
                "order": order, "block_input": block_input}

    @staticmethod
    def _last_block(blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the last block once, also returning the cls + dist attention over the patches
        (softmax(q k^T * scale) rows 0 and 1, summed over heads and rows, key columns 2:)."""
        attn = blk.attn
        B, N, C = x.shape
        y = blk.norm1(x)
        qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # The official map is detached; it ranks patches, so it is computed in float32 even under
        # autocast (bf16 scores would reorder near-ties).
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            rows = ((q[:, :, :2].float() @ k.float().transpose(-2, -1)) * attn.scale).softmax(dim=-1)
            attn_map = rows[:, :, :, 2:].sum(dim=1).sum(dim=1)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + blk.ls1(attn.proj(attn.norm(o)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return x, attn_map

    def forward(self, images: torch.Tensor) -> Features:
        out = self.forward_features(images)
        return Features(out["global_descriptor"], out["local_tokens"])

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> Features:
        """Eval-mode, no-grad features on the model's device, float32 whatever the autocast."""
        if self.training:
            self.eval()
        plan = self._run_plan()
        images = images.to(plan.device, non_blocking=True)
        with autocast(plan):
            out = self.forward_features(images)
        return Features(out["global_descriptor"].float(), out["local_tokens"].float())

    @torch.no_grad()
    def rerank_logits(self, query_tokens: torch.Tensor, candidate_tokens: torch.Tensor,
                      chunk_pairs: int | None = None, dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """(P, T, 131) twice -> (P, 2) float32 on the inputs' device; score = softmax[:, 1].

        Runs where the model's parameters are. ``dtype`` None / float32 (default): float32 end to
        end, the official logits (an autocast around the call is switched off here). bfloat16
        (opt-in): the two transformer levels under bf16 autocast, correlation and top-5 in float32;
        faster on GPUs and bf16 CPUs, logits move by ~1e-2."""
        if self.reranker.training:
            self.reranker.eval()
        dev = query_tokens.device
        with torch.autocast(device_type=self.device.type, enabled=False):
            logits = self.reranker(query_tokens.to(self.device), candidate_tokens.to(self.device),
                                   chunk_pairs=chunk_pairs, dtype=dtype)
        return logits.float().to(dev)

    def explain(self, query_tokens: torch.Tensor, candidate_tokens: torch.Tensor, top: int = 20):
        """The reranker's most relied-on token pairs for one pair (``RerankTransformer.explain``);
        for the report only, separate from ``rerank_logits``."""
        return self.reranker.explain(torch.as_tensor(query_tokens).to(self.device),
                                     torch.as_tensor(candidate_tokens).to(self.device), top=top)

    # ------------------------------------------------------------------ loading
    def _finish(self, path: Path | None, layout: str) -> R2Former:
        if path is not None:
            self.info.update(checkpoint=str(path), checkpoint_sha256=ckpt.file_sha256(path))
        self.info["layout"] = layout
        return self.float().eval()

    @classmethod
    def from_official_checkpoint(cls, path: str | Path, **overrides: Any) -> R2Former:
        """A released training checkpoint (``model_state_dict`` with ``module.`` names) -> CPU
        float32 eval model. Stage-1 (global-only) files load the backbone and warn."""
        path = Path(path)
        obj = ckpt.load_file(path)
        if not ckpt.is_official_layout(obj):
            raise ckpt.CheckpointError(f"{path}: not an official R2Former checkpoint (no 'model_state_dict'; "
                                       f"top-level keys {sorted(obj)[:8] if isinstance(obj, dict) else type(obj)})")
        return cls._from_official_state_dict(obj["model_state_dict"], path, **overrides)

    @classmethod
    def _from_official_state_dict(cls, official_sd, path: Path | None, **overrides: Any) -> R2Former:
        sd, stage1 = ckpt.checkpoint_filter_fn(official_sd)
        source = str(path) if path else "state_dict"
        input_size = overrides.pop("img_size", None)
        grid_size = R2FormerConfig.img_size
        if "backbone.pos_embed" in sd:
            grid_size = _pos_grid_size(sd["backbone.pos_embed"].shape[1] - 2, input_size, source)
        model = cls(R2FormerConfig(img_size=grid_size, **overrides), init_weights=False)
        model.info["image_size"] = list(input_size or grid_size)
        own = model.state_dict()
        ckpt.check_keys(own.keys(), sd.keys(), source,
                        allowed_missing_prefixes=("local_head.", "reranker.") if stage1 else ())
        ckpt.check_shapes(own, sd, source)
        model.load_state_dict(sd, strict=not stage1)
        model.has_trained_reranker = not stage1
        if stage1:
            warnings.warn(f"{source} is a stage-1 (global retrieval) checkpoint: backbone loaded, local_head and "
                          f"reranker are untrained (random init); local tokens and rerank scores are meaningless "
                          f"until stage-2 training", UserWarning, stacklevel=3)
        return model._finish(path, "official-stage1" if stage1 else "official")

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> R2Former:
        """An official release checkpoint or one in the project layout (``save_checkpoint``).

        ``img_size`` here is the size images will be extracted at; the positional-embedding grid
        stays the checkpoint's and is adapted per input (any multiple of 16 works)."""
        path = Path(path)
        obj = ckpt.load_file(path)
        if ckpt.is_official_layout(obj):
            return cls._from_official_state_dict(obj["model_state_dict"], path, **overrides)
        if not ckpt.is_project_layout(obj):
            raise ckpt.CheckpointError(f"{path}: neither an official R2Former checkpoint nor format "
                                       f"{ckpt.PROJECT_FORMAT!r}")
        if obj.get("backbone") != "r2former":
            raise ckpt.CheckpointError(f"{path}: holds backbone {obj.get('backbone')!r}, not 'r2former'")
        input_size = overrides.pop("img_size", None)
        config = R2FormerConfig.from_dict({**obj["config"], **overrides})
        model = cls(config, init_weights=False)
        model.info["image_size"] = list(input_size or config.img_size)
        own = model.state_dict()
        ckpt.check_keys(own.keys(), obj["state_dict"].keys(), str(path))
        ckpt.check_shapes(own, obj["state_dict"], str(path))
        model.load_state_dict(obj["state_dict"])
        model.has_trained_reranker = bool(obj.get("has_trained_reranker", True))
        return model._finish(path, "project")

    def save_checkpoint(self, path: str | Path, layout: str = "project", **official_extra: Any) -> Path:
        """Write the project layout (weights_only-safe) or the official six-entry layout."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}
        if layout == "project":
            obj = ckpt.project_checkpoint_dict(sd, self.config.to_dict(),
                                               extra={"has_trained_reranker": bool(self.has_trained_reranker)})
        elif layout == "official":
            obj = ckpt.official_checkpoint_dict(ckpt.to_official_state_dict(sd), **official_extra)
        else:
            raise ValueError(f"layout must be 'project' or 'official', got {layout!r}")
        torch.save(obj, path)
        return path

    @classmethod
    def from_timm_pretrained(cls, path: str | Path | None = None, **overrides: Any) -> R2Former:
        """Start for training: ImageNet DeiT-S distilled weights in timm layout (a ``.pth``/``.bin``
        state_dict, optionally under ``model``/``state_dict``, or ``.safetensors``). Heads,
        local head and reranker stay at their initialisation; ``pos_embed`` is resampled from the
        file's grid to ``img_size`` (bicubic, timm's way). Without ``path``: the timm weights in the
        Hugging Face cache, else a download (needs network; a clear error without)."""
        if path is None:
            path = _timm_weights_file()
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"timm weights file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors
            sd = load_safetensors(str(path))
        else:
            sd = ckpt.load_file(path)
            for wrapper in ("model", "state_dict"):
                if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
                    sd = sd[wrapper]
        if not isinstance(sd, dict) or "pos_embed" not in sd:
            raise ckpt.CheckpointError(f"{path}: not a timm DeiT state_dict (no 'pos_embed')")
        model = cls(R2FormerConfig(**overrides), init_weights=False)
        model._load_timm_state_dict(sd, source)
        model.has_trained_reranker = False
        return model._finish(path, "timm-pretrained")

    def _load_timm_state_dict(self, sd: dict, source: str) -> None:
        from timm.layers import resample_abs_pos_embed
        bb = self.backbone
        own = bb.state_dict()
        # ImageNet classifier heads (1000 classes) are replaced by the 256-d descriptor heads.
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
        ckpt.check_keys(own.keys(), sd.keys(), source, allowed_missing_prefixes=("head.", "head_dist."))
        pe = sd["pos_embed"]
        if pe.shape != own["pos_embed"].shape:
            old = int(round((pe.shape[1] - 2) ** 0.5))
            sd["pos_embed"] = resample_abs_pos_embed(pe.float(), new_size=list(self.grid), old_size=[old, old],
                                                     num_prefix_tokens=2)
        ckpt.check_shapes(own, sd, source)
        bb.load_state_dict(sd, strict=False)
        for head in (bb.head, bb.head_dist):     # new 256-d heads, timm's ViT head init
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
