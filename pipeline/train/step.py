"""One training step of a recipe on one batch: the official loss, backward, gradient reduction
across workers, optimizer step. The Ray Train loop and the parity bench both call ``step``.

Batch layout (the official TripletsDataset / collate_fn): item i of a worker's share holds the
images (or stored tokens) of its query, positive and ``negs`` negatives at rows
``i*(2+negs) + (0, 1, 2..)``; ``triplets`` is (negs, b, 3): slot t lists (query, positive,
negative t) rows of every item, as the official loop iterates them (train_reranker.py:176-178).

Loss for a global batch of B queries over W workers (train_reranker.py:166-235)::

    loss = 1/(B negs) * sum_t [ sum_b triplet(g_q, g_p, g_n_t)                       (triplet_loss)
                               + rerank_weight * CE_mean over the slot's 2B pairs ]   (rerank_loss)

Each worker computes the part of this sum that its items contribute (the CE as a sum over its
pairs divided by 2B, not by its own 2b), and the gradients are SUMMED over workers
(``allreduce_gradients``), so W workers take exactly the step of one worker on the global batch.
Positives are re-scored once per negative slot, as in the official loop.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .recipes import Recipe

if TYPE_CHECKING:   # torch loads when a step runs, not when ``pipeline.train`` is imported
    import torch


@dataclass
class Batch:
    triplets: torch.Tensor                  # (negs, b, 3) int64 rows of images / tokens
    global_batch: int                       # B: queries per step over all workers
    images: torch.Tensor | None = None      # (N, 3, H, W) ImageNet-normalised
    tokens: torch.Tensor | None = None      # (N, T, 131) stored local tokens (rerank on tokens)

    @property
    def negs(self) -> int:
        return int(self.triplets.shape[0])


@dataclass
class StepOutput:
    loss: float                             # this worker's share: the shares sum to the official loss
    triplet_per_slot: list[float] = field(default_factory=list)   # sum-reduced over this worker's items
    ce_per_slot: list[float] = field(default_factory=list)        # this worker's share of the slot's mean CE
    logits_pos: list[torch.Tensor] = field(default_factory=list)  # per slot, (b, 2), detached
    logits_neg: list[torch.Tensor] = field(default_factory=list)


def triplet_rows(items: int, negs: int) -> np.ndarray:
    """(negs, items, 3) rows of the official collate layout (item i at i*(2+negs))."""
    base = np.arange(items, dtype=np.int64)[None, :] * (2 + negs)
    t = np.arange(negs, dtype=np.int64)[:, None]
    return np.stack([np.broadcast_to(base, (negs, items)), np.broadcast_to(base + 1, (negs, items)),
                     base + 2 + t], axis=2)


def prepare_model(model, recipe: Recipe, rerank_source: str = "images", freeze_batchnorm: bool = False
                  ) -> list[str]:
    """Trainable parts, train/eval modes and the local head's gradient path as ``recipe`` sets
    them; on stored tokens (``rerank_source='tokens'``) the local head is not in the graph, so it
    does not train. Returns the trainable parameter names."""
    from ..model import training as mt

    parts = tuple(p for p in recipe.trains if not (rerank_source == "tokens" and p == "local_head"))
    names = mt.set_trainable(model, parts)
    mt.set_local_grad_to_backbone(model, recipe.local_grad_to_backbone)
    mt.set_modes(model, recipe.train_mode, freeze_batchnorm=freeze_batchnorm)
    return names


def losses(model, batch: Batch, recipe: Recipe, *, adapter=None, rerank_weight: float = 1.0
           ) -> tuple[torch.Tensor, StepOutput]:
    """This worker's share of the recipe's loss (a tensor with its graph) and its parts."""
    import torch
    import torch.nn.functional as F

    from ..model import training as mt

    if batch.images is not None:
        f = mt.describe(model, batch.images)
        g, local = f.global_descriptor, f.local_tokens
    elif batch.tokens is not None:
        if recipe.triplet_loss:
            raise ValueError(f"recipe {recipe.name} has a triplet loss: it needs images, not stored tokens")
        g, local = None, mt.adapt_tokens(batch.tokens, adapter)
    else:
        raise ValueError("a batch needs images or tokens")
    B, negs = int(batch.global_batch), batch.negs
    total = 0.0
    out = StepOutput(loss=0.0)
    reranker = mt.reranker(model)
    for t in range(negs):
        q, p, n = batch.triplets[t, :, 0], batch.triplets[t, :, 1], batch.triplets[t, :, 2]
        if recipe.triplet_loss:
            trip = F.triplet_margin_loss(g[q], g[p], g[n], margin=recipe.margin, p=2, eps=1e-6, swap=False,
                                         reduction="sum")
            total = total + trip
            out.triplet_per_slot.append(float(trip.detach()))
        if recipe.rerank_loss:
            b = len(q)
            logits = reranker(torch.cat([local[q], local[q]]), torch.cat([local[p], local[n]]))
            target = torch.cat([torch.ones(b), torch.zeros(b)]).long().to(logits.device)
            ce = F.cross_entropy(logits, target, reduction="sum") / (2 * B)
            total = total + rerank_weight * ce
            out.ce_per_slot.append(float(ce.detach()))
            out.logits_pos.append(logits[:b].detach())
            out.logits_neg.append(logits[b:].detach())
    if not torch.is_tensor(total):
        raise ValueError(f"recipe {recipe.name} computes no loss")
    loss = total / (B * negs)
    out.loss = float(loss.detach())
    return loss, out


def optimizer_parameters(optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def allreduce_gradients(params) -> None:
    """Sum the gradients over the torch.distributed workers (one flat all-reduce). Parameters
    without a gradient stay without one (AdamW then neither moves nor decays them, as in the
    official step); the recipe decides which those are, the same on every worker."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def step(model, batch: Batch, recipe: Recipe, optimizer, *, adapter=None, rerank_weight: float = 1.0,
         reduce_gradients: Callable[[list], None] | None = allreduce_gradients) -> StepOutput:
    """One optimisation step: zero the gradients, this worker's loss share, backward, sum the
    gradients over workers (``reduce_gradients``; a no-op on one process), optimizer step.
    The model's trainable parts and modes are set beforehand (``prepare_model``), the learning rate
    by the caller (``recipes.epoch_lr``)."""
    optimizer.zero_grad(set_to_none=True)
    loss, out = losses(model, batch, recipe, adapter=adapter, rerank_weight=rerank_weight)
    loss.backward()
    if reduce_gradients is not None:
        reduce_gradients(optimizer_parameters(optimizer))
    optimizer.step()
    return out
