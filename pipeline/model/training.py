"""What training changes on a model: which parts learn, which run in train mode, whether the rerank
loss reaches the backbone; the token adapter of the stored-token path and how it folds into the
local projection; the model as one module with a mode argument. Training code calls these instead of
reaching into a model's attributes.

A model is split into three parts by its top-level modules:

    backbone     everything that makes the global descriptor and the block input (DeiT-S / EfficientNet)
    local_head   the projection of that input to the 128-d local token features
                 (``R2Former.local_head``, ``EfficientNetLite0VPR.local_proj``)
    reranker     the ``RerankTransformer``

The official training script selects its trainable set by name in the same way
(``'local_head' in name or 'Reranker' in name`` with ``--fix 1``, train_reranker.py:66-70).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

PARTS = ("backbone", "local_head", "reranker")
# Top-level module names of the local projection in the models of this package.
_LOCAL_HEAD_NAMES = ("local_head", "local_proj")


def part_of_module(name: str) -> str:
    """The part a top-level module (or a parameter named under it) belongs to."""
    top = name.split(".", 1)[0]
    if top in _LOCAL_HEAD_NAMES:
        return "local_head"
    if top == "reranker":
        return "reranker"
    return "backbone"


def _check_parts(parts: Iterable[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown model part(s) {bad}; parts are {PARTS}")
    return parts


def local_head(model: nn.Module) -> nn.Linear:
    """The local projection module (``local_head`` / ``local_proj``)."""
    for name, child in model.named_children():
        if name in _LOCAL_HEAD_NAMES:
            return child
    raise AttributeError(f"{type(model).__name__} has no local projection ({' / '.join(_LOCAL_HEAD_NAMES)})")


def reranker(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if name == "reranker":
            return child
    raise AttributeError(f"{type(model).__name__} has no reranker")


def set_trainable(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """``requires_grad`` True exactly for the parameters of ``parts``; returns their names in
    ``model.parameters()`` order (the order an optimizer built from them sees)."""
    parts = _check_parts(parts)
    for name, p in model.named_parameters():
        p.requires_grad_(part_of_module(name) in parts)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def set_modes(model: nn.Module, train_parts: Iterable[str], freeze_batchnorm: bool = False) -> None:
    """Train mode for the modules of ``train_parts``, eval mode for the rest. ``freeze_batchnorm``
    keeps every BatchNorm in eval mode (statistics fixed), whatever its part."""
    train_parts = _check_parts(train_parts)
    model.train()
    for name, child in model.named_children():
        child.train(part_of_module(name) in train_parts)
    if freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def set_local_grad_to_backbone(model: nn.Module, enabled: bool) -> None:
    """Official ``--finetune``: whether the local head's input keeps its graph, so that the rerank
    loss reaches the backbone (True) or only the local head and the reranker (False)."""
    model.config.local_grad_to_backbone = bool(enabled)


def freeze_state(model: nn.Module) -> dict[str, object]:
    """What these functions set, for logging: trainable tensors per part, modes per part."""
    count = {p: 0 for p in PARTS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            count[part_of_module(name)] += 1
    modes = {}
    for name, child in model.named_children():
        modes.setdefault(part_of_module(name), set()).add("train" if child.training else "eval")
    return {"trainable_tensors": count, "modes": {k: "/".join(sorted(v)) for k, v in modes.items()},
            "local_grad_to_backbone": bool(model.config.local_grad_to_backbone)}


# ---------------------------------------------------------------- what training adds around a model
def describe(model: nn.Module, images: torch.Tensor):
    """Differentiable ``Features(global_descriptor, local_tokens)`` of normalised images."""
    from .features import Features

    out = model.forward_features(images)
    if isinstance(out, dict):
        return Features(out["global_descriptor"], out["local_tokens"])
    return out


def adapt_tokens(tokens: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    """Stored tokens through the token adapter (a Linear on the 128-d features; x, y, att kept)."""
    if adapter is None:
        return tokens
    return torch.cat([tokens[..., :3], adapter(tokens[..., 3:])], dim=-1)


def token_adapter(model: nn.Module) -> nn.Linear:
    """Identity-initialised Linear on the stored 128-d token features (the stored-token path's
    stand-in for the local projection, see ``fold_token_adapter``)."""
    dim = local_head(model).out_features
    adapter = nn.Linear(dim, dim)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(dim))
        adapter.bias.zero_()
    return adapter


def fold_token_adapter(model: nn.Module, adapter: nn.Linear | None) -> nn.Module:
    """A copy of ``model`` whose local projection is ``adapter ∘ projection``: both are linear, so
    the stored-token path trained exactly this projection (W' = A W, b' = A b + c)."""
    import copy

    if adapter is None:
        return model
    out = copy.deepcopy(model)
    proj = local_head(out)
    with torch.no_grad():
        A, c = adapter.weight.detach().cpu(), adapter.bias.detach().cpu()
        W, b = proj.weight.detach().cpu().clone(), proj.bias.detach().cpu().clone()
        proj.weight.copy_(A @ W)
        proj.bias.copy_(A @ b + c)
    return out


class StepModule(nn.Module):
    """The model (and the token adapter) as one module with a mode argument, for validation and
    benchmarks: ``"global"`` images -> global descriptors, ``"rerank_tokens"`` (query tokens,
    candidate tokens) -> logits."""

    def __init__(self, model: nn.Module, adapter: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, mode: str, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if mode == "global":
            return describe(self.model, a).global_descriptor
        if mode == "rerank_tokens":
            return reranker(self.model)(adapt_tokens(a, self.adapter), adapt_tokens(b, self.adapter))
        raise ValueError(f"unknown mode {mode!r}")
