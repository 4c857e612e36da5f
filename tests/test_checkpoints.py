"""Checkpoint reading and writing: strict key checks, the stage-1 layout, the project layout,
timm-pretrained starts. One random model's weights are written in each layout under test."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from pipeline.model import R2Former
from pipeline.model import checkpoint as ck
from pipeline.model.r2former import TIMM_ARCH, _hub_reachable


@pytest.fixture(scope="module")
def source_model():
    m = R2Former().eval()
    m.has_trained_reranker = True
    return m


@pytest.fixture(scope="module")
def official_sd(source_model):
    return ck.to_official_state_dict(source_model.state_dict())


def _write_official(path, official_sd, **kw):
    torch.save(ck.official_checkpoint_dict(official_sd, recalls=np.array([1.0, 2.0, 3.0, 4.0]),
                                           best_r5=np.float64(2.0), **kw), path)
    return path


def _same_weights(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def test_official_names_map_to_reranker_and_back(official_sd):
    assert "module.Reranker.pair_head.weight" in official_sd
    assert "module.backbone.blocks.11.attn.qkv.weight" in official_sd
    ours, stage1 = ck.checkpoint_filter_fn(official_sd)
    assert not stage1 and "reranker.pair_head.weight" in ours and "local_head.weight" in ours
    assert ck.to_official_state_dict(ours).keys() == official_sd.keys()


def test_official_round_trip_with_optimizer_state(tmp_path, source_model, official_sd):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    path = _write_official(tmp_path / "best_model.pth", official_sd, optimizer_state=opt.state_dict())
    m = R2Former.from_official_checkpoint(path)
    assert m.has_trained_reranker and not m.training and m.info["layout"] == "official"
    assert m.info["checkpoint_sha256"] == ck.file_sha256(path)
    assert _same_weights(source_model.state_dict(), m.state_dict())
    # img_size at load time is the extraction size; the stored 30 x 40 grid is kept and adapted
    m = R2Former.load(path, img_size=(272, 480))
    assert m.config.img_size == (480, 640) and m.info["image_size"] == [272, 480]
    feats = m.extract(torch.zeros(1, 3, 272, 480))
    assert feats.local_tokens.shape == (1, 500, 131) and torch.isfinite(feats.local_tokens).all()


@pytest.mark.parametrize("drop,match", [("module.Reranker.pair_head.bias", "reranker.pair_head.bias"),
                                        ("module.local_head.weight", "local_head.weight"),
                                        ("module.backbone.blocks.3.mlp.fc2.bias", "backbone.blocks.3.mlp.fc2.bias")])
def test_missing_key_is_an_error_naming_it(tmp_path, official_sd, drop, match):
    sd = {k: v for k, v in official_sd.items() if k != drop}
    path = _write_official(tmp_path / "missing.pth", sd)
    with pytest.raises(ck.CheckpointError, match=f"missing keys.*{match}"):
        R2Former.from_official_checkpoint(path)


def test_unexpected_key_and_wrong_shape_are_errors_naming_them(tmp_path, official_sd):
    path = _write_official(tmp_path / "extra.pth", {**official_sd, "module.aggregation.1.weight": torch.zeros(3)})
    with pytest.raises(ck.CheckpointError, match=r"unexpected keys.*aggregation\.1\.weight"):
        R2Former.from_official_checkpoint(path)
    bad = dict(official_sd)
    bad["module.local_head.weight"] = torch.zeros(64, 384)
    path = _write_official(tmp_path / "shape.pth", bad)
    with pytest.raises(ck.CheckpointError, match=r"local_head\.weight.*\(64, 384\)"):
        R2Former.from_official_checkpoint(path)


def test_stage1_global_only_layout_loads_backbone_and_warns(tmp_path, source_model, official_sd):
    # stage-1 files hold only the backbone, without the ``backbone.`` level
    sd = {"module." + k[len("module.backbone."):]: v for k, v in official_sd.items() if k.startswith("module.backbone.")}
    path = _write_official(tmp_path / "stage1.pth", sd)
    with pytest.warns(UserWarning, match="stage-1.*untrained"):
        m = R2Former.from_official_checkpoint(path)
    assert not m.has_trained_reranker and m.info["layout"] == "official-stage1"
    assert _same_weights(source_model.state_dict(), m.state_dict(), "backbone.")
    assert not torch.equal(m.reranker.pair_head.weight, source_model.reranker.pair_head.weight)
    # a stage-1 file missing a backbone key is still an error
    del sd["module.norm.bias"]
    path = _write_official(tmp_path / "stage1_bad.pth", sd)
    with pytest.raises(ck.CheckpointError, match=r"backbone\.norm\.bias"):
        R2Former.from_official_checkpoint(path)


def test_project_layout_round_trip_is_weights_only_safe(tmp_path, source_model):
    path = source_model.save_checkpoint(tmp_path / "model.pt", layout="project")
    raw = torch.load(path, map_location="cpu", weights_only=True)      # no allow-list needed
    assert raw["format"] == ck.PROJECT_FORMAT and raw["backbone"] == "r2former"
    m = R2Former.load(path)
    assert m.info["layout"] == "project" and m.has_trained_reranker
    assert m.config == source_model.config
    assert _same_weights(source_model.state_dict(), m.state_dict())
    # official layout written by us reads back through the official loader
    m2 = R2Former.load(source_model.save_checkpoint(tmp_path / "official.pth", layout="official"))
    assert m2.info["layout"] == "official" and _same_weights(source_model.state_dict(), m2.state_dict())


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        R2Former.load(tmp_path / "nowhere.pth")
    torch.save({"foo": 1}, tmp_path / "foreign.pth")
    with pytest.raises(ck.CheckpointError, match="foreign.pth"):
        R2Former.load(tmp_path / "foreign.pth")
    # arbitrary pickled objects are refused by the weights-only reader
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model_state_dict": {}, "x": warnings.WarningMessage}, f, protocol=2)
    with pytest.raises(ck.CheckpointError, match="weights_only"):
        R2Former.load(tmp_path / "evil.pth")


@pytest.fixture(scope="module")
def timm_state_dict():
    import timm
    torch.manual_seed(0)
    return timm.create_model(TIMM_ARCH, pretrained=False).state_dict()     # 224 grid, 1000 classes


@pytest.mark.parametrize("wrap", ["plain", "model", "safetensors"])
def test_timm_pretrained_file(tmp_path, timm_state_dict, wrap):
    if wrap == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "deit.safetensors"
        save_file({k: v.contiguous() for k, v in timm_state_dict.items()}, str(path))
    else:
        path = tmp_path / "deit.pth"
        torch.save({"model": timm_state_dict} if wrap == "model" else timm_state_dict, path)
    m = R2Former.from_timm_pretrained(path)
    sd = m.backbone.state_dict()
    assert torch.equal(sd["blocks.5.attn.qkv.weight"], timm_state_dict["blocks.5.attn.qkv.weight"])
    assert sd["pos_embed"].shape == (1, 2 + 30 * 40, 384)
    assert torch.equal(sd["pos_embed"][:, :2], timm_state_dict["pos_embed"][:, :2])
    assert sd["head.weight"].shape == (256, 384) and torch.isfinite(sd["head.weight"]).all()
    assert not m.has_trained_reranker and m.info["layout"] == "timm-pretrained"
    feats = m.extract(torch.zeros(1, 3, 64, 96))
    assert feats.local_tokens.shape == (1, 24, 131) and torch.isfinite(feats.global_descriptor).all()


def test_timm_file_missing_a_block_key_names_it(tmp_path, timm_state_dict):
    sd = {k: v for k, v in timm_state_dict.items() if k != "blocks.0.norm1.weight"}
    torch.save(sd, tmp_path / "deit_bad.pth")
    with pytest.raises(ck.CheckpointError, match=r"blocks\.0\.norm1\.weight"):
        R2Former.from_timm_pretrained(tmp_path / "deit_bad.pth")


def test_timm_pretrained_without_file_or_network_is_a_clear_error(tmp_path, monkeypatch):
    if _hub_reachable():
        pytest.skip("huggingface.co is reachable here; the offline error path cannot be exercised")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(RuntimeError, match="unreachable.*from_timm_pretrained"):
        R2Former.from_timm_pretrained()
