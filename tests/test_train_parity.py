"""Training takes the official step: bench/train_parity.py on the official training-step fixture
(folder from R2F_TRAIN_FIXTURE, default ../shared/parity/r2former_official_train_seed0), the
recipes' official settings, the deprecated ``stage`` alias, and W workers = one worker on the
global batch.

The W-worker check runs ``pipeline.train.step`` itself in two threads, each on its half of the
batch (items r::2, as the Ray Train loop deals them), with the gradient all-reduce replaced by a
sum across the two threads' models; it compares with one ``step`` on the whole batch. It does
not start Ray (the Ray Train loop calls the same ``step`` with a torch.distributed all-reduce)."""
from __future__ import annotations

import copy
import importlib.util
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PARITY

from pipeline.train import (
    RECIPES,
    Batch,
    ConfigError,
    DataConfig,
    TrainConfig,
    build_optimizer,
    epoch_lr,
    get_recipe,
    prepare_model,
    resolve_recipe,
    step,
    triplet_rows,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("R2F_TRAIN_FIXTURE", PARITY / "r2former_official_train_seed0"))


def _bench():
    spec = importlib.util.spec_from_file_location("train_parity", ROOT / "bench" / "train_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (FIXTURE / "fixture.npz").exists(), reason=f"no training fixture at {FIXTURE}")
def test_bench_train_parity_passes_on_the_official_fixture(tmp_path, capsys):
    out = tmp_path / "parity.json"
    code = _bench().main(["--fixture", str(FIXTURE), "--json", str(out)])
    printed = capsys.readouterr().out
    import json
    rows = json.loads(out.read_text())
    assert code == 0, printed
    fx = np.load(FIXTURE / "fixture.npz")
    assert {r["recipe"] for r in rows} == {k.split("/")[0] for k in fx.files if k.endswith("/loss") and k.count("/") == 1}
    for r in rows:
        assert r["ok"] and not r["problems"], r
        assert r["tensors_in_optimizer"] == len(fx[f"{r['recipe']}/optimizer_param_keys"])
        assert r["tensors_with_grad"] == len(fx[f"{r['recipe']}/grad_keys"])


def test_official_recipe_settings():
    rr, ft, e2e, s1 = (RECIPES[n] for n in ("rerank", "finetune", "end_to_end", "retrieval"))
    # AdamW wd 0.03, per-epoch warmup from 0.1 x lr, then the cosine counted from epoch 0
    assert (rr.optimizer, rr.weight_decay, rr.lr, rr.epochs, rr.batch_size, rr.num_negatives) == \
        ("adamw", 0.03, 5e-4, 50, 64, 1)
    assert epoch_lr(rr, 0) == pytest.approx(5e-5, rel=1e-12)
    assert epoch_lr(rr, 4) == pytest.approx(0.82 * 5e-4, rel=1e-12)
    assert epoch_lr(rr, 5) / rr.lr == pytest.approx(0.5 * (1 + np.cos(np.pi * 5 / 50)), rel=1e-12)   # 0.976
    assert epoch_lr(ft, 5) / ft.lr == pytest.approx(0.854, abs=1e-3)
    assert epoch_lr(e2e, 5) / e2e.lr == pytest.approx(0.994, abs=1e-3)
    assert max(epoch_lr(rr, e) for e in range(rr.epochs)) < rr.lr
    # what trains
    assert rr.trains == ("local_head", "reranker") and rr.train_mode == ("reranker",) and not rr.triplet_loss
    assert not ft.local_grad_to_backbone and e2e.local_grad_to_backbone and ft.num_negatives == 2
    # stage 1: plain Adam, no decay, no schedule, triplet loss only, backbone only
    assert (s1.optimizer, s1.weight_decay, s1.schedule, s1.rerank_loss, s1.trains) == \
        ("adam", 0.0, "constant", False, ("backbone",))
    assert all(epoch_lr(s1, e) == s1.lr for e in range(s1.epochs))
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], rr)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.03 and opt.param_groups[0]["eps"] == 1e-8


def test_stage_alias_and_deviations():
    with pytest.warns(DeprecationWarning, match="recipe: rerank"):
        assert resolve_recipe(TrainConfig(stage="rerank")).name == "rerank"
    # a config value replaces the recipe's only where set
    r = resolve_recipe(TrainConfig(recipe="finetune", lr=3e-5, num_negatives=1))
    assert (r.lr, r.num_negatives, r.weight_decay, r.epochs) == (3e-5, 1, 0.03, 20)
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_recipe(TrainConfig(recipe="end_to_end", stage="finetune"))
    with pytest.raises(ConfigError, match="recipe must be one of"):
        validate(TrainConfig(recipe="nope", init="random"))
    # the official rerank recipe trains from images: stored tokens are the named deviation
    with pytest.raises(ConfigError, match="train.queries"):
        validate(TrainConfig(recipe="rerank", init="random",
                             train=DataConfig(queries_store="a", database_store="b", hardest_negatives="c")))


class ThreadSum:
    """All-reduce (sum) of gradients between models stepped in threads, one per simulated worker."""

    def __init__(self, models):
        self.models, self.barrier = models, threading.Barrier(len(models))
        self.summed: dict[str, torch.Tensor] = {}

    def __call__(self, _params) -> None:
        if self.barrier.wait() == 0:        # every worker's backward is done
            for named in zip(*(m.named_parameters() for m in self.models)):
                grads = [p.grad for _, p in named if p.grad is not None]
                if grads:
                    total = torch.stack(grads).sum(0)
                    self.summed[named[0][0]] = total.clone()
                    for _, p in named:
                        p.grad = total.clone()
        self.barrier.wait()


def _tiny_batch(items: int, negs: int, rows: np.ndarray | None = None):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(items * (2 + negs), 3, 64, 64, generator=g)
    if rows is not None:          # these items only, in the official layout
        images = images.view(items, 2 + negs, 3, 64, 64)[rows].reshape(-1, 3, 64, 64)
    n = items if rows is None else len(rows)
    return images, torch.from_numpy(triplet_rows(n, negs))


def test_two_workers_take_the_one_worker_step():
    """end_to_end with 2 negatives: triplet and rerank losses, gradients through the whole model."""
    from pipeline.model import R2Former

    torch.manual_seed(0)
    base = R2Former(img_size=(64, 64), num_local=12)
    recipe = get_recipe("end_to_end").with_options(num_negatives=2)
    B, negs, lr = 4, 2, 1e-3

    def worker_model():
        m = copy.deepcopy(base)
        prepare_model(m, recipe)
        return m, build_optimizer([p for p in m.parameters() if p.requires_grad], recipe, lr)

    one, opt1 = worker_model()
    images, trip = _tiny_batch(B, negs)
    full_grads: dict[str, torch.Tensor] = {}

    def record(_params):
        full_grads.update({n: p.grad.clone() for n, p in one.named_parameters() if p.grad is not None})

    ref = step(one, Batch(triplets=trip, global_batch=B, images=images), recipe, opt1, reduce_gradients=record)

    workers = [worker_model() for _ in range(2)]
    reducer = ThreadSum([m for m, _ in workers])
    shares: list = [None, None]

    def run(r):
        rows = np.arange(B)[r::2]
        img, t = _tiny_batch(B, negs, rows)
        m, opt = workers[r]
        shares[r] = step(m, Batch(triplets=t, global_batch=B, images=img), recipe, opt, reduce_gradients=reducer)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s is not None for s in shares)
    # the shares of the loss add up to the global batch's loss (divided by B x negs, not by b x negs)
    assert shares[0].loss + shares[1].loss == pytest.approx(ref.loss, rel=1e-5)
    assert set(reducer.summed) == set(full_grads)
    for n, g in full_grads.items():
        torch.testing.assert_close(reducer.summed[n], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-12)
    # the same update: both workers' parameters equal the one-worker step's (first AdamW step moves
    # each element by about lr, so a gradient near 0 may move anywhere in [-lr, lr])
    after = dict(one.named_parameters())
    for m, _ in workers:
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.detach(), after[n].detach(), rtol=0, atol=2 * lr)
        moved = [n for n, p in m.named_parameters() if not torch.equal(p.detach(), base.state_dict()[n])]
        assert moved == [n for n, p in after.items() if not torch.equal(p.detach(), base.state_dict()[n])]
