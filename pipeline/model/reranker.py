"""The R²Former reranking transformer: two logits per (query, candidate) pair of token sets.

Numerically it is the official ``R2Former`` reranker (model/R2Former.py of the release), with
the same parameter names, so that ``checkpoint_filter_fn`` only has to strip ``module.Reranker.``.
What differs is how it gets there, to be fast and lean on memory:

- The official code builds a (P, N, M, 7) matrix of every (query, candidate) token combination,
  argsorts the whole N x M correlation twice and gathers 7-channel copies. Here only the top-k
  of each row and column is taken (``torch.topk``), and the 7 -> 32 ``pair_head`` is split into
  its query part, candidate part and correlation column, so that the query and candidate parts are
  projected once per token and gathered as 32-d rows.
- Pairs are processed in chunks (``chunk_pairs``) so peak memory is bounded whatever P is.
- Only token 0 of the last block of each level is read, so that block computes attention and MLP
  for the class token only; ``decoder_norm`` is per token, so applying it to token 0 alone is exact.

- Inference (no autograd) runs the blocks through ``_fast_block`` (token-0-only attention of the
  last blocks elementwise). With ``cpu_attention = "blocked"`` (opt-in; the default "sdpa" is
  PyTorch's fused kernel, faster at 2 threads) the 1001-token level-2 attention is one head at a time, scores in the log2 domain (``exp2`` is ~4x cheaper than
  ``exp`` on CPU), the softmax denominator from a ones column appended to V (no normalising pass
  over the L x L matrix), and the max subtraction skipped where the Cauchy-Schwarz bound
  |q|·|k| shows no overflow is possible. Same function, float32 rounding only (~1e-7). Training
  (grad enabled) runs the timm blocks unchanged.

Token layout (both sides): column 0 x, 1 y, 2 attention (all in [0, 1] after clamping),
columns 3: the local feature (L2-normalised here, as the official code does).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

TOKEN_DIM = 131          # x, y, attention, 128-d feature
COORD_DIM = 3            # x, y, attention
CORR_DIM = 7             # [x_q, y_q, att_q, x_c, y_c, att_c, correlation]


def resolve_rerank_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None / float32 / "float32" -> None (plain float32); bfloat16 / "bfloat16" -> torch.bfloat16."""
    if dtype in (None, torch.float32, "float32"):
        return None
    if dtype in (torch.bfloat16, "bfloat16"):
        return torch.bfloat16
    raise ValueError(f"rerank dtype must be float32 or bfloat16, got {dtype!r}")


def sincos_embed_2d(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., 2) positions in [0, 1] -> (..., dim): first half sin/cos of x, second half of y.

    Matches the official ``get_2d_sincos_pos_embed_from_grid``: each half is
    [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (dim/4)), the raw coordinate as position.
    """
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float32, device=xy.device)
    omega = 1.0 / 10000 ** (omega / quarter)
    out = xy.float().unsqueeze(-1) * omega                       # (..., 2, quarter)
    emb = torch.cat([out.sin(), out.cos()], dim=-1)              # (..., 2, dim/2)
    return emb.flatten(-2).to(xy.dtype)


# |score| below this (log2 domain) cannot overflow float32 even summed over 10^6 keys.
_EXP2_SAFE = 100.0
# Sequences at least this long take the per-head CPU attention; shorter ones (level 1: 6 tokens)
# stay in one batched SDPA call, where per-head Python overhead would dominate.
_LONG_SEQ = 64
_ROW_BLOCK = 256         # 256 x 1001 float32 scores = 1 MiB


def _self_attention(qkv: torch.Tensor, num_heads: int, scale: float, blocked: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale) v of every token: (B, L, 3C) qkv -> (B, L, C), no autograd.
    ``blocked`` False always takes PyTorch's fused SDPA (for comparison)."""
    B, L, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    t = qkv.view(B, L, 3, num_heads, d).permute(2, 0, 3, 1, 4)                 # (3, B, H, L, d)
    if not blocked or qkv.device.type != "cpu" or L < _LONG_SEQ or torch.is_autocast_enabled(qkv.device.type):
        return F.scaled_dot_product_attention(t[0], t[1], t[2]).transpose(1, 2).reshape(B, L, C)
    # CPU, long sequences: per (sequence, head) two matmuls around one in-place exp2 pass over the
    # L x L scores (the fused CPU SDPA kernel is ~2x slower at head_dim 8).
    q = (t[0] * (scale * math.log2(math.e))).reshape(B * num_heads, L, d)
    k = t[1].reshape(B * num_heads, L, d)
    vt = torch.empty(B * num_heads, d + 1, L, dtype=qkv.dtype)
    vt[:, :d] = t[2].transpose(-2, -1).reshape(B * num_heads, d, L)
    vt[:, d] = 1.0                                   # this row of V^T P^T is the softmax denominator
    unsafe = (q.norm(dim=-1).amax(1) * k.norm(dim=-1).amax(1) > _EXP2_SAFE).tolist()
    r = torch.empty(B * num_heads, d + 1, L, dtype=qkv.dtype)
    for i in range(B * num_heads):
        kt = k[i].t()
        for a in range(0, L, _ROW_BLOCK):            # a (rows, L) score block stays in L2 cache
            s = torch.mm(q[i, a:a + _ROW_BLOCK], kt)  # scores * log2(e)
            if unsafe[i]:
                s -= s.amax(1, keepdim=True)
            s.exp2_()
            torch.mm(vt[i], s.t(), out=r[i, :, a:a + _ROW_BLOCK])   # (d + 1, rows): the fast GEMM shape
    o = r[:, :d] / r[:, d:]
    return o.view(B, num_heads, d, L).permute(0, 3, 1, 2).reshape(B, L, C)


def _cls_attention(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention output of token 0 only: (B, L, 3C) -> (B, C). Elementwise (one query row)."""
    B, L, C3 = qkv.shape
    C = C3 // 3
    t = qkv.view(B, L, 3, num_heads, C // num_heads)
    s = (t[:, :1, 0] * t[:, :, 1]).sum(-1) * scale                               # (B, L, H)
    p = s.softmax(dim=1)
    return (p.unsqueeze(-1) * t[:, :, 2]).sum(1).reshape(B, C)


def _fast_block(blk: Block, x: torch.Tensor, blocked: bool = True) -> torch.Tensor:
    """A timm ``Block`` (default options: no layer scale, no qk-norm, no dropout) without autograd."""
    attn = blk.attn
    x = x + attn.proj(_self_attention(attn.qkv(blk.norm1(x)), attn.num_heads, attn.scale, blocked))
    return x + blk.mlp(blk.norm2(x))


def _block_cls_only(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """Run a timm ``Block`` but return only its output for token 0: (B, N, C) -> (B, C).

    Attention keys/values still come from all tokens; only the query row and the MLP of token 0
    are computed, which is what the official forward ends up reading.
    """
    attn = blk.attn
    B, N, C = x.shape
    y = blk.norm1(x)
    if torch.is_grad_enabled():
        qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q[:, :, :1], k, v).transpose(1, 2).reshape(B, C)   # (B, C)
    else:
        o = _cls_attention(attn.qkv(y), attn.num_heads, attn.scale)
    x0 = x[:, 0] + attn.proj(o)
    return x0 + blk.mlp(blk.norm2(x0))


class RerankTransformer(nn.Module):
    """``forward(query_tokens (P, N, 131), candidate_tokens (P, M, 131)) -> logits (P, 2)``.

    Defaults are the released configuration (num_corr=5, dim 32, 4 heads, mlp 128, 2 blocks at
    the correspondence level, 6 at the token level, num_local 500 sizing the unused
    ``decoder_pos_embed`` kept for checkpoint fidelity). The match score is
    ``softmax(logits)[:, 1]``.
    """

    def __init__(self, embed_dim: int = 32, num_heads: int = 4, mlp_ratio: float = 4.0,
                 depth: int = 6, depth_corr: int = 2, num_corr: int = 5, num_local: int = 500,
                 num_classes: int = 2, token_dim: int = TOKEN_DIM, chunk_pairs: int = 16):
        super().__init__()
        if num_classes != 2:
            raise ValueError("only the 2-logit head of the released model is supported")
        self.embed_dim = embed_dim
        self.num_corr = num_corr
        self.token_dim = token_dim
        self.chunk_pairs = chunk_pairs
        # "sdpa": PyTorch's fused kernel (default: fastest at 2 threads in bench/bench_official.py);
        # "blocked": the per-head exp2 CPU attention of ``_self_attention``, faster with 1 thread.
        self.cpu_attention = "sdpa"
        norm = partial(nn.LayerNorm, eps=1e-6)
        # Names and shapes as in the official module (Reranker.* keys of the release).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_token_2 = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Never read by the official forward; kept so released checkpoints load strictly.
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 2 * num_local + 1, embed_dim))
        # Only enters ``final_score`` (global/local blend), not the logits.
        self.ratio = nn.Parameter(torch.full((1,), 0.5))
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.blocks_2 = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth_corr)])
        # One LayerNorm shared by both levels, as in the release.
        self.decoder_norm = norm(embed_dim)
        self.pair_head = nn.Linear(CORR_DIM, embed_dim)
        self.pair_head_2 = nn.Linear(embed_dim, embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The official initialisation (trunc-normal tokens, xavier Linear, unit LayerNorm).
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_token_2, std=0.02)
        nn.init.normal_(self.decoder_pos_embed[:, 1:], std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ level helpers
    def _encode(self, x: torch.Tensor, cls: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        """Prepend ``cls``, run ``blocks`` and return the normalised token 0: (B, L, C) -> (B, C)."""
        x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if torch.is_grad_enabled():
            run = (lambda blk, t: blk(t))
        else:
            run = partial(_fast_block, blocked=self.cpu_attention == "blocked")
        for blk in blocks[:-1]:
            x = run(blk, x)
        return self.decoder_norm(_block_cls_only(blocks[-1], x))

    def _check(self, q: torch.Tensor, c: torch.Tensor) -> None:
        for name, t in (("query_tokens", q), ("candidate_tokens", c)):
            if t.ndim != 3 or t.shape[-1] != self.token_dim:
                raise ValueError(f"{name} must be (P, T, {self.token_dim}), got {tuple(t.shape)}")
        if q.shape[0] != c.shape[0]:
            raise ValueError(f"query_tokens and candidate_tokens need the same number of pairs, "
                             f"got {q.shape[0]} and {c.shape[0]}")
        if min(q.shape[1], c.shape[1]) < 1:
            raise ValueError("token sets must hold at least one token")

    def forward(self, query_tokens: torch.Tensor, candidate_tokens: torch.Tensor,
                chunk_pairs: int | None = None, dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """``dtype`` None or float32: float32 throughout (the official numbers). bfloat16: the two
        transformer levels run under bf16 autocast (correlation and top-k stay float32, so the
        chosen correspondences are the float32 ones); logits move by ~1e-2, opt-in only."""
        self._check(query_tokens, candidate_tokens)
        low = resolve_rerank_dtype(dtype)
        step = chunk_pairs or self.chunk_pairs
        P = query_tokens.shape[0]
        if P <= step:
            return self._forward_chunk(query_tokens, candidate_tokens, low)
        return torch.cat([self._forward_chunk(query_tokens[s:s + step], candidate_tokens[s:s + step], low)
                          for s in range(0, P, step)], dim=0)

    def _forward_chunk(self, q: torch.Tensor, c: torch.Tensor, low: torch.dtype | None = None) -> torch.Tensor:
        P, N, _ = q.shape
        M = c.shape[1]
        dt = self.pair_head.weight.dtype
        q = q.to(dt)
        c = c.to(dt)
        qf = F.normalize(q[:, :, COORD_DIM:], p=2, dim=2)
        cf = F.normalize(c[:, :, COORD_DIM:], p=2, dim=2)
        qc = q[:, :, :COORD_DIM].detach().clamp(0, 1)
        cc = c[:, :, :COORD_DIM].detach().clamp(0, 1)

        corr = torch.bmm(qf, cf.transpose(1, 2))                          # (P, N, M) cosine
        kq = min(self.num_corr, M)
        kc = min(self.num_corr, N)
        val_q, idx_q = corr.topk(kq, dim=2)                                # per query token: best candidates
        val_c, idx_c = corr.transpose(1, 2).topk(kc, dim=2)                # per candidate token: best queries
        del corr

        # pair_head(7-vector) = W_q @ coord_q + W_c @ coord_c + w_corr * corr + b, split so each
        # side is projected once per token; the level-1 embedding of the candidate position
        # (entries 3, 4 of every 7-vector) is folded into the candidate part.
        W = self.pair_head.weight
        proj_q = qc @ W[:, :COORD_DIM].t()                                # (P, N, C)
        proj_c = cc @ W[:, COORD_DIM:2 * COORD_DIM].t() + sincos_embed_2d(cc[:, :, :2], self.embed_dim)
        w_corr = W[:, 2 * COORD_DIM]
        bias = self.pair_head.bias
        rows = torch.arange(P, device=q.device).view(P, 1, 1)

        side_q = proj_q.unsqueeze(2) + proj_c[rows, idx_q] + val_q.unsqueeze(-1) * w_corr + bias   # (P,N,kq,C)
        side_c = proj_q[rows, idx_c] + proj_c.unsqueeze(2) + val_c.unsqueeze(-1) * w_corr + bias   # (P,M,kc,C)
        emb_q = sincos_embed_2d(qc[:, :, :2], self.embed_dim)              # (P, N, C)
        with (torch.autocast(device_type=q.device.type, dtype=low) if low is not None else nullcontext()):
            return self._levels(side_q, side_c, emb_q, idx_c[:, :, 0]).float()

    def _levels(self, side_q: torch.Tensor, side_c: torch.Tensor, emb_q: torch.Tensor,
                best_q: torch.Tensor) -> torch.Tensor:
        """Level 1 over each token's correspondences, level 2 over the pair's tokens -> (P, 2)."""
        P, N, kq, _ = side_q.shape
        M, kc = side_c.shape[1:3]
        if kq == kc:
            lvl1 = self._encode(torch.cat([side_q, side_c], dim=1).flatten(0, 1), self.cls_token_2, self.blocks_2)
            lvl1 = lvl1.view(P, N + M, -1)
        else:
            lvl1 = torch.cat([self._encode(side_q.flatten(0, 1), self.cls_token_2, self.blocks_2).view(P, N, -1),
                              self._encode(side_c.flatten(0, 1), self.cls_token_2, self.blocks_2).view(P, M, -1)],
                             dim=1)
        lvl1 = self.pair_head_2(lvl1)

        # Level 2 position: the query-image position of each token's top-1 correspondence
        # (a query token's own position; for a candidate token, its best query token's).
        emb_c = emb_q[torch.arange(P, device=emb_q.device).view(P, 1), best_q]   # (P, M, C)
        x = lvl1 + torch.cat([emb_q, emb_c], dim=1)
        x = self._encode(x, self.cls_token, self.blocks)
        return self.decoder_pred(x)

    def final_score(self, global_q: torch.Tensor, global_c: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The official second output: cos(global) * c + prob1 * (1 - c), c = clamp(ratio, 0.1, 0.9).
        The official ranking does not use it; kept for completeness."""
        c = self.ratio.clamp(0.1, 0.9)
        return F.cosine_similarity(global_q, global_c, dim=1) * c + logits.softmax(dim=1)[:, 1] * (1 - c)

    # ------------------------------------------------------------------ explanation (report only)
    def explain(self, query_tokens: torch.Tensor, candidate_tokens: torch.Tensor, top: int = 20) -> TokenPairs:
        """The token pairs the match logit of ONE (query, candidate) pair relies on most.

        (N, 131) and (M, 131) tokens (or (1, N, 131) / (1, M, 131)) -> ``TokenPairs`` of at most
        ``top`` (query token index, candidate token index, weight), highest weight first::

            tokens -> top-k correspondences -> e (one 32-d embedding per correspondence: a query
            token i with candidate token idx_q[i, k], or a candidate token j with query token
            idx_c[j, k]) -> level 1 -> level 2 -> logits -> margin = logit[1] - logit[0]
            weight(i, j) = sum over the correspondences e of (i, j) of  <d margin / d e, e>

        The weight is gradient x input of the match margin with respect to the pair's
        correspondence embeddings: to first order, how much the margin (log-odds of "same
        place") would drop if the reranker did not see that pair. Positive: the pair argues for a
        match; a pair proposed from both sides (i's best candidate is j and j's best query is i)
        sums both. Weights compare pairs within one pair of images, not across image pairs.

        Separate from ``forward``: float32, autograd on, the timm blocks (the training path,
        the same function as the fast inference path to float32 rounding); parameters get no
        ``.grad`` and the fast path is not touched. The front half mirrors ``_forward_chunk``
        (tests/test_report.py checks ``margin`` against ``forward``).
        """
        q = torch.as_tensor(query_tokens)
        c = torch.as_tensor(candidate_tokens)
        q = q.unsqueeze(0) if q.ndim == 2 else q
        c = c.unsqueeze(0) if c.ndim == 2 else c
        self._check(q, c)
        if q.shape[0] != 1:
            raise ValueError(f"explain takes one pair, got {q.shape[0]}")
        W = self.pair_head.weight
        q = q.to(W.device, W.dtype)
        c = c.to(W.device, W.dtype)
        # inference_mode(False): callers may sit inside inference_mode (the scorers do).
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type=W.device.type, enabled=False):
            q, c = q.clone(), c.clone()
            qf = F.normalize(q[:, :, COORD_DIM:], p=2, dim=2)
            cf = F.normalize(c[:, :, COORD_DIM:], p=2, dim=2)
            qc = q[:, :, :COORD_DIM].clamp(0, 1)
            cc = c[:, :, :COORD_DIM].clamp(0, 1)
            corr = torch.bmm(qf, cf.transpose(1, 2))[0]                       # (N, M)
            N, M = corr.shape
            val_q, idx_q = corr.topk(min(self.num_corr, M), dim=1)            # (N, kq)
            val_c, idx_c = corr.t().topk(min(self.num_corr, N), dim=1)        # (M, kc)
            proj_q = (qc @ W[:, :COORD_DIM].t())[0]                           # (N, C)
            proj_c = (cc @ W[:, COORD_DIM:2 * COORD_DIM].t()
                      + sincos_embed_2d(cc[:, :, :2], self.embed_dim))[0]       # (M, C)
            w_corr, bias = W[:, 2 * COORD_DIM], self.pair_head.bias
            side_q = (proj_q.unsqueeze(1) + proj_c[idx_q] + val_q.unsqueeze(-1) * w_corr + bias)
            side_c = (proj_q[idx_c] + proj_c.unsqueeze(1) + val_c.unsqueeze(-1) * w_corr + bias)
            side_q = side_q.detach().requires_grad_(True)
            side_c = side_c.detach().requires_grad_(True)
            emb_q = sincos_embed_2d(qc[:, :, :2], self.embed_dim)
            logits = self._levels(side_q.unsqueeze(0), side_c.unsqueeze(0), emb_q, idx_c[None, :, 0])[0]
            margin = logits[1] - logits[0]
            g_q, g_c = torch.autograd.grad(margin, (side_q, side_c))
        rel_q = (g_q * side_q).sum(-1).detach()                               # (N, kq)
        rel_c = (g_c * side_c).sum(-1).detach()                               # (M, kc)
        # Every correspondence as a (query token, candidate token) pair; duplicates summed.
        qi = torch.cat([torch.arange(N, device=W.device).repeat_interleave(idx_q.shape[1]), idx_c.flatten()])
        ci = torch.cat([idx_q.flatten(), torch.arange(M, device=W.device).repeat_interleave(idx_c.shape[1])])
        key = qi * M + ci
        uniq, inv = key.unique(return_inverse=True)
        w = torch.zeros(len(uniq), dtype=torch.float32, device=W.device)
        w.index_add_(0, inv, torch.cat([rel_q.flatten(), rel_c.flatten()]).float())
        order = torch.argsort(w, descending=True)[:max(0, int(top))]
        uq, uc = (uniq[order] // M), (uniq[order] % M)
        return TokenPairs(query_index=uq.cpu().numpy(), candidate_index=uc.cpu().numpy(),
                          weight=w[order].cpu().numpy(),
                          similarity=corr.detach()[uq, uc].float().cpu().numpy(),
                          margin=float(margin.detach()))


@dataclass
class TokenPairs:
    """What ``RerankTransformer.explain`` returns: parallel arrays, highest ``weight`` first.
    ``similarity``: cosine of the two tokens' features; ``margin``: logit[1] - logit[0] explained
    (the match score is sigmoid(margin) = softmax(logits)[1])."""
    query_index: np.ndarray       # (K,) int64, rows of the query's tokens
    candidate_index: np.ndarray   # (K,) int64, rows of the candidate's tokens
    weight: np.ndarray            # (K,) float32, gradient x input of the margin (see explain)
    similarity: np.ndarray        # (K,) float32
    margin: float

    def __len__(self) -> int:
        return len(self.weight)

    def __iter__(self):
        """(query index, candidate index, weight) tuples."""
        return iter(zip(self.query_index.tolist(), self.candidate_index.tolist(), self.weight.tolist()))
