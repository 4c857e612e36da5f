"""R²Former against numbers made with the official code (../shared/parity, two input sizes).

The weights are regenerated from the fixture's formula, written as an official training
checkpoint (once per session) and read back through ``R2Former.from_official_checkpoint``.
Tolerances are the ones the fixture README suggests for a float32 CPU re-implementation.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import Features, R2Former, normalize_images
from pipeline.model import checkpoint as ck
from pipeline.model.r2former import adapt_pos_embed
from pipeline.model.reranker import sincos_embed_2d

FIXTURES = ["r2former_official_seed0", "r2former_official_seed0_416x576"]


@pytest.fixture(scope="session")
def official_ckpts(parity_dir, tmp_path_factory):
    """The seed-0 weights in the official file format, with ``recalls``/``best_r5`` as numpy objects
    (what the training script writes) and as plain Python values."""
    sd = {}
    for name in FIXTURES:     # both fixtures list the same weights; regenerate and check both tables
        sd = ck.formula_state_dict(parity_dir / name / "keys.tsv", seed=0, verify=True)
        assert len(sd) == 265
    official = {"module." + k: v for k, v in sd.items()}
    d = tmp_path_factory.mktemp("official_ckpt")
    paths = {}
    for variant, recalls, best in (("numpy", np.array([0.0, 0.0, 0.0, 0.0]), np.float64(0.0)),
                                   ("plain", [0.0, 0.0, 0.0, 0.0], 0.0)):
        obj = ck.official_checkpoint_dict(official, recalls=recalls, best_r5=best)
        paths[variant] = d / f"r2former_seed0_{variant}.pth"
        torch.save(obj, paths[variant])
    return paths


@pytest.fixture(scope="session")
def model(official_ckpts):
    m = R2Former.from_official_checkpoint(official_ckpts["numpy"])
    torch.set_num_threads(2)
    return m


@pytest.fixture(scope="module", params=FIXTURES)
def case(request, parity_dir, model):
    fx = dict(np.load(parity_dir / request.param / "fixture.npz"))
    images = normalize_images(torch.from_numpy(fx["images"]))
    with torch.no_grad():
        out = {k: v.numpy() for k, v in model.forward_features(images).items()}
    # logits of the official tokens, shared by the reranking tests (reranking dominates test time)
    lf = torch.from_numpy(fx["local_features"])
    out["logits_of_official_tokens"] = model.rerank_logits(lf[fx["pair_query_index"]], lf[fx["pair_candidate_index"]])
    return request.param, fx, out, images


def _sorted_rows(tokens: np.ndarray, order: np.ndarray) -> np.ndarray:
    return tokens[np.argsort(order)]


def test_checkpoint_variants_load_identically(official_ckpts, model):
    assert model.has_trained_reranker and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.info["checkpoint_sha256"] and len(model.info["checkpoint_sha256"]) == 64
    plain = R2Former.load(official_ckpts["plain"])
    a, b = model.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_global_descriptor(case):
    _, fx, out, _ = case
    np.testing.assert_allclose(out["global_descriptor"], fx["global_desc"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(out["global_descriptor"], axis=1), 1.0, atol=1e-6)


def test_positional_embedding_adaptation(case, model):
    _, fx, _, images = case
    h, w = images.shape[2] // 16, images.shape[3] // 16
    with torch.no_grad():
        pe = adapt_pos_embed(model.backbone.pos_embed, model.grid, h, w).numpy()
    np.testing.assert_allclose(pe, fx["pos_embed_effective"], atol=1e-6, rtol=0)


def test_attention_map_and_selected_tokens(case):
    _, fx, out, _ = case
    np.testing.assert_allclose(out["attn_map"], fx["attn_map"], atol=1e-7, rtol=0)
    np.testing.assert_allclose(out["block_input"], fx["block11_input"], atol=1e-4, rtol=0)
    for i in range(len(fx["order"])):
        assert set(out["order"][i].tolist()) == set(fx["order"][i].tolist()), f"image {i}: token set differs"
        # ranks may swap inside 1-ulp ties; the ranked values may not
        np.testing.assert_allclose(fx["attn_map"][i][out["order"][i]], fx["attn_map"][i][fx["order"][i]],
                                   atol=1e-7, rtol=0)


def test_local_tokens(case):
    _, fx, out, _ = case
    assert out["local_tokens"].shape == fx["local_features"].shape
    for i in range(len(fx["order"])):
        ours = _sorted_rows(out["local_tokens"][i], out["order"][i])
        ref = _sorted_rows(fx["local_features"][i], fx["order"][i])
        np.testing.assert_allclose(ours[:, :2], ref[:, :2], atol=1e-7, rtol=0)
        np.testing.assert_allclose(ours[:, 2], ref[:, 2], atol=1e-6, rtol=0)
        np.testing.assert_allclose(ours[:, 3:], ref[:, 3:], atol=1e-4, rtol=0)


def test_rerank_logits(case, model):
    _, fx, out, _ = case
    qi, ci = fx["pair_query_index"], fx["pair_candidate_index"]
    ours = torch.from_numpy(out["local_tokens"])
    for logits in (out["logits_of_official_tokens"], model.rerank_logits(ours[qi], ours[ci])):
        np.testing.assert_allclose(logits.numpy(), fx["rerank_logits"], atol=2e-5, rtol=0)
        np.testing.assert_allclose(logits.softmax(1)[:, 1].numpy(), fx["rerank_prob1"], atol=1e-5, rtol=0)
    g = torch.from_numpy(fx["global_desc"])
    with torch.no_grad():
        final = model.reranker.final_score(g[qi], g[ci], out["logits_of_official_tokens"])
    np.testing.assert_allclose(final.numpy(), fx["rerank_final_score"], atol=1e-5, rtol=0)


def test_rerank_is_order_invariant_and_chunk_independent(case, model):
    _, fx, out, _ = case
    lf = torch.from_numpy(fx["local_features"])
    qi, ci = fx["pair_query_index"][:7], fx["pair_candidate_index"][:7]
    g = torch.Generator().manual_seed(0)
    perm_q, perm_c = torch.randperm(lf.shape[1], generator=g), torch.randperm(lf.shape[1], generator=g)
    base = out["logits_of_official_tokens"][:7]
    shuffled = model.rerank_logits(lf[qi][:, perm_q], lf[ci][:, perm_c], chunk_pairs=3)
    np.testing.assert_allclose(shuffled.numpy(), base.numpy(), atol=2e-6, rtol=0)


def test_extract_api(case, model):
    _, fx, out, images = case
    feats = model.extract(images[-1:])
    assert isinstance(feats, Features)
    assert feats.global_descriptor.shape == (1, 256) and feats.local_tokens.shape == (1, 500, 131)
    assert feats.global_descriptor.dtype == torch.float32 and not feats.local_tokens.requires_grad
    np.testing.assert_allclose(feats.global_descriptor.numpy(), fx["global_desc"][-1:], atol=1e-5, rtol=0)


def test_corrected_gather_takes_the_ranked_patch(case, model):
    name, fx, out, images = case
    fixed = R2Former(img_size=model.config.img_size, corrected_gather=True, init_weights=False)
    fixed.load_state_dict(model.state_dict())
    fixed.eval()
    with torch.no_grad():
        o = fixed.forward_features(images[:1])
        want = model.local_head(o["block_input"][0, o["order"][0] + 2])
    got = o["local_tokens"][0, :, 3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    official = torch.from_numpy(_sorted_rows(fx["local_features"][0], fx["order"][0])[:, 3:])
    ours = _sorted_rows(o["local_tokens"][0].numpy(), o["order"][0].numpy())[:, 3:]
    assert np.abs(ours - official.numpy()).max() > 0.1, f"{name}: corrected gather should differ from the quirk"
    # x, y, attention do not depend on the gather (rows by patch: batch 1 vs 4 can swap 1-ulp ties)
    mine = _sorted_rows(o["local_tokens"][0, :, :3].numpy(), o["order"][0].numpy())
    base = _sorted_rows(out["local_tokens"][0, :, :3], out["order"][0])
    np.testing.assert_allclose(mine, base, atol=1e-6)


def test_float16_token_storage_moves_logits_little(case, model):
    _, fx, out, _ = case
    lf = torch.from_numpy(fx["local_features"])
    qi, ci = fx["pair_query_index"], fx["pair_candidate_index"]
    base = out["logits_of_official_tokens"]
    half = lf.half().float()
    moved = (model.rerank_logits(half[qi], half[ci]) - base).abs().max().item()
    assert moved < 5e-3, f"float16 storage moved logits by {moved}"


# ---------------------------------------------------------------------------- reference reranker
def _reference_logits(rr, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The official algorithm written out plainly (full 7-vector matrix, full sorts), for any
    token counts: checks the lean implementation away from the fixture's 500 x 500 case."""
    P, N, _ = q.shape
    M = c.shape[1]
    qf = torch.nn.functional.normalize(q[:, :, 3:], dim=2)
    cf = torch.nn.functional.normalize(c[:, :, 3:], dim=2)
    qc, cc = q[:, :, :3].clamp(0, 1), c[:, :, :3].clamp(0, 1)
    corr = qf @ cf.transpose(1, 2)
    full = torch.cat([qc.unsqueeze(2).expand(P, N, M, 3), cc.unsqueeze(1).expand(P, N, M, 3), corr.unsqueeze(3)], 3)
    k = rr.num_corr
    oq = corr.argsort(dim=2, descending=True)[:, :, :k]
    ok = corr.argsort(dim=1, descending=True)[:, :k, :]
    sel_q = torch.gather(full, 2, oq.unsqueeze(3).expand(-1, -1, -1, 7))
    sel_k = torch.gather(full, 1, ok.unsqueeze(3).expand(-1, -1, -1, 7)).permute(0, 2, 1, 3)
    sel = torch.cat([sel_q, sel_k], 1)                                        # (P, N+M, k, 7)
    x = rr.pair_head(sel) + sincos_embed_2d(sel[..., 3:5], rr.embed_dim)
    x = x.flatten(0, 1)
    x = torch.cat([rr.cls_token_2.expand(x.shape[0], -1, -1), x], 1)
    for blk in rr.blocks_2:
        x = blk(x)
    x = rr.pair_head_2(rr.decoder_norm(x)[:, 0]).view(P, N + M, -1)
    x = x + sincos_embed_2d(sel[:, :, 0, 0:2], rr.embed_dim)
    x = torch.cat([rr.cls_token.expand(P, -1, -1), x], 1)
    for blk in rr.blocks:
        x = blk(x)
    return rr.decoder_pred(rr.decoder_norm(x)[:, 0])


@pytest.mark.parametrize("n,m", [(40, 40), (12, 30), (7, 5)])
def test_rerank_matches_plain_reference_for_other_token_counts(model, n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    q = torch.rand(3, n, 131, generator=g)
    c = torch.rand(3, m, 131, generator=g)
    q[:, :, 3:] -= 0.5
    c[:, :, 3:] -= 0.5
    with torch.no_grad():
        want = _reference_logits(model.reranker, q, c)
    np.testing.assert_allclose(model.rerank_logits(q, c).numpy(), want.numpy(), atol=2e-5, rtol=0)


def test_bad_token_shapes_are_named(model):
    with pytest.raises(ValueError, match="candidate_tokens"):
        model.rerank_logits(torch.zeros(2, 10, 131), torch.zeros(2, 10, 130))
    with pytest.raises(ValueError, match="multiples of 16"):
        model.extract(torch.zeros(1, 3, 100, 64))


def test_training_forward_has_gradients(model):
    m = R2Former(img_size=model.config.img_size, local_grad_to_backbone=True, init_weights=False)
    m.load_state_dict(model.state_dict())
    m.train()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    feats = m(x)
    assert feats.global_descriptor.requires_grad and feats.local_tokens.requires_grad
    logits = m.reranker(feats.local_tokens[:1], feats.local_tokens[1:])
    (logits[:, 1].sum() + feats.global_descriptor[:, 0].sum()).backward()
    for name in ("backbone.blocks.0.attn.qkv.weight", "backbone.head.weight", "local_head.weight",
                 "reranker.pair_head.weight", "reranker.blocks.5.mlp.fc2.weight", "reranker.blocks_2.0.attn.qkv.weight"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_inputs_follow_the_parameters_not_a_stale_plan(model, parity_dir):
    """A model placed for CUDA and then moved back with ``.to("cpu")`` must not send its inputs to
    CUDA (no GPU here: the old plan-based path raised); it runs float32 where its weights are."""
    import copy

    from pipeline.device import DevicePlan
    m = copy.deepcopy(model)
    m.plan = DevicePlan(torch.device("cuda"), torch.bfloat16)   # what place() on a GPU host records
    m.to("cpu")
    assert m.device.type == "cpu" and m._run_plan().autocast_dtype is None
    lf = torch.from_numpy(np.load(parity_dir / FIXTURES[0] / "fixture.npz")["local_features"])
    np.testing.assert_array_equal(m.rerank_logits(lf[:2], lf[1:3]).numpy(), model.rerank_logits(lf[:2], lf[1:3]).numpy())
    feats = m.extract(torch.zeros(1, 3, 64, 64))
    assert feats.global_descriptor.dtype == torch.float32 and feats.global_descriptor.device.type == "cpu"


def test_rerank_dtype_is_float32_by_default_and_bf16_on_request(case, model):
    _, fx, out, _ = case
    lf = torch.from_numpy(fx["local_features"])
    qi, ci = fx["pair_query_index"][:4], fx["pair_candidate_index"][:4]
    base = out["logits_of_official_tokens"][:4]
    with torch.autocast("cpu", dtype=torch.bfloat16):       # a caller's autocast does not lower it
        np.testing.assert_allclose(model.rerank_logits(lf[qi], lf[ci]).numpy(), base.numpy(), atol=2e-6, rtol=0)
    low = model.rerank_logits(lf[qi], lf[ci], dtype="bfloat16")
    assert low.dtype == torch.float32 and not torch.equal(low, base)
    np.testing.assert_allclose(low.numpy(), base.numpy(), atol=5e-2, rtol=0)
    # the per-head CPU attention (opt-in) and PyTorch's fused kernel give the same logits
    model.reranker.cpu_attention = "blocked"
    try:
        np.testing.assert_allclose(model.rerank_logits(lf[qi], lf[ci]).numpy(), base.numpy(), atol=2e-6, rtol=0)
    finally:
        model.reranker.cpu_attention = "sdpa"
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        model.rerank_logits(lf[qi], lf[ci], dtype="float16")
