"""One training step of the project against one step of the official ``train_reranker.run_train()``.

    python bench/train_parity.py --fixture ../shared/parity/r2former_official_train_seed0

Reads everything of the fixture from its folder (README.md there describes the computations):
the seed and image size (``fixture.npz``), the recipes (the ``<cfg>/loss`` keys), the tolerances
(``generation_report.json``), the weights' formula check table (``keys.tsv``). For each recipe:
regenerate the formula weights, load them as an official checkpoint, set the model up as the
project's recipe says (``pipeline.train.prepare_model``), build the optimizer with the recipe's
epoch-0 learning rate and run ``pipeline.train.step`` once on the fixture's batch. Checks:

    learning rate          the recipe's whole per-epoch schedule equals the official one
    optimizer tensors      the same keys, in the same order
    loss, parts, logits    within the fixture's atol
    keys with a gradient   exactly the fixture's set
    gradients              per key, |d sum| and |d max|g|| (all keys), element-wise (stored keys),
                           relative to the key's own scale (reranker / other tolerances)
    after the step         changed and unchanged keys exactly; element-wise (stored keys) and
                           per-key parameter and update sums (all changed keys)

Prints one row per recipe with the worst ratio (difference / tolerance) per check and the key;
exits 1 when a ratio exceeds 1 or a set differs. CPU, float32.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.model import R2Former, normalize_images  # noqa: E402
from pipeline.model import checkpoint as ck  # noqa: E402
from pipeline.train import Batch, build_optimizer, epoch_lr, get_recipe, prepare_model, step, triplet_rows  # noqa: E402

DEFAULT_FIXTURE = ROOT.parent / "shared" / "parity" / "r2former_official_train_seed0"


def official_name(key: str) -> str:
    return next(iter(ck.to_official_state_dict({key: None})))[len("module."):]


def ulp32(x: np.ndarray) -> np.ndarray:
    return np.spacing(np.abs(np.asarray(x, np.float32))).astype(np.float64)


class Worst:
    """The largest difference/tolerance ratio seen for one check, with its key."""

    def __init__(self):
        self.ratio, self.key = 0.0, ""

    def add(self, diff: float, tol: float, key: str = "") -> None:
        r = float(diff) / float(tol) if tol > 0 else (0.0 if diff == 0 else float("inf"))
        if not r <= self.ratio:     # NaN counts as worst
            self.ratio, self.key = r, key

    def __str__(self) -> str:
        return f"{self.ratio:.3g}" + (f" ({self.key})" if self.key else "")


def load_fixture(folder: Path) -> tuple[dict, dict, list[str]]:
    fx = dict(np.load(folder / "fixture.npz"))
    report = json.loads((folder / "generation_report.json").read_text())
    configs = [k.split("/")[0] for k in fx if k.endswith("/loss") and k.count("/") == 1]
    return fx, report, configs


def start_model(folder: Path, seed: int, size: tuple[int, int]) -> R2Former:
    """The formula weights written as an official training checkpoint and read back the way users'
    official checkpoints are read."""
    sd = ck.formula_state_dict(folder / "keys.tsv", seed=seed, verify=True)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "formula.pth"
        torch.save(ck.official_checkpoint_dict({"module." + k: v for k, v in sd.items()}), path)
        return R2Former.from_official_checkpoint(path, img_size=size)


def _check_schedule_and_layout(recipe, f, lr: float) -> list[str]:
    """The learning-rate schedule, the step's rate, the number of negatives and the batch layout."""
    problems: list[str] = []
    # learning rate: the recipe's schedule is the official one, and the step uses epoch 0's
    schedule = np.array([epoch_lr(recipe, e) for e in range(recipe.epochs)])
    if schedule.shape != f("lr_schedule").shape or not np.allclose(schedule, f("lr_schedule"), rtol=1e-12, atol=0):
        problems.append(f"lr schedule differs: {schedule[:6]} vs {f('lr_schedule')[:6]}")
    if abs(lr - float(f("lr_used"))) > 1e-12 * abs(lr):
        problems.append(f"lr {lr!r} vs official {float(f('lr_used'))!r}")

    triplets = f("triplet_index_per_negative")
    negs, B = triplets.shape[:2]
    if negs != recipe.num_negatives:
        problems.append(f"recipe has {recipe.num_negatives} negatives, the official command {negs}")
    if not np.array_equal(triplets, triplet_rows(B, negs)):
        problems.append("the project's batch layout (step.triplet_rows) differs from the official collate")

    return problems


def _compare_loss(out, f, tol: dict, worst: dict) -> list[str]:
    """The loss, its parts per negative slot, and the reranker's logits."""
    problems: list[str] = []
    # loss and its parts
    worst["loss"].add(abs(out.loss - float(f("loss"))), tol["loss"])
    for t, v in enumerate(f("global_triplet_loss_per_negative")):
        worst["parts"].add(abs(out.triplet_per_slot[t] - float(v)), tol["loss"], f"triplet slot {t}")
    for t, v in enumerate(f("rerank_ce_loss_per_negative")):
        worst["parts"].add(abs(out.ce_per_slot[t] - float(v)), tol["loss"], f"ce slot {t}")
    if len(out.triplet_per_slot) != len(f("global_triplet_loss_per_negative")) or \
            len(out.ce_per_slot) != len(f("rerank_ce_loss_per_negative")):
        problems.append("the loss has other parts than the official one")
    for t in range(len(out.logits_pos)):
        for side, ours in (("pos", out.logits_pos[t]), ("neg", out.logits_neg[t])):
            d = np.abs(ours.numpy() - f(f"rerank_logits_{side}_t{t}")).max()
            worst["logits"].add(d, tol["logits"], f"{side} slot {t}")

    return problems


def _compare_gradients(grads: dict, f, fx: dict, name: str, tol: dict, worst: dict) -> list[str]:
    """Exactly the keys with a gradient, and each gradient's sum, max and (where kept) elements."""
    problems: list[str] = []
    # gradients
    grad_keys = [str(k) for k in f("grad_keys")]
    if set(grads) != set(grad_keys):
        problems.append(f"keys with a gradient: {len(set(grads) - set(grad_keys))} extra "
                        f"{sorted(set(grads) - set(grad_keys))[:3]}, {len(set(grad_keys) - set(grads))} missing "
                        f"{sorted(set(grad_keys) - set(grads))[:3]}")
    for i, k in enumerate(grad_keys):
        if k not in grads:
            continue
        g = grads[k].double().numpy()
        rr = k.startswith("Reranker.")
        r_elem = tol["grad_elem_rtol_reranker" if rr else "grad_elem_rtol_other"]
        r_sum = tol["grad_sum_rtol_reranker" if rr else "grad_sum_rtol_other"]
        maxabs, abssum = float(f("grad_maxabs")[i]), float(f("grad_abssum_f64")[i])
        worst["grad_sum"].add(abs(g.sum() - float(f("grad_sum_f64")[i])), r_sum * abssum + tol["grad_atol"], k)
        worst["grad_maxabs"].add(abs(np.abs(g).max() - maxabs), r_elem * maxabs + tol["grad_atol"], k)
        if f"{name}/grad/{k}" in fx:
            worst["grad_elem"].add(np.abs(g - f(f"grad/{k}")).max(), r_elem * maxabs + tol["grad_atol"], k)

    return problems


def _compare_after_step(params: dict, before: dict, f, fx: dict, name: str, tol: dict, lr: float,
                        worst: dict) -> tuple[set, list[str]]:
    """The changed and unchanged keys, and each changed tensor after the step."""
    problems: list[str] = []
    # after the step
    own = {official_name(n): n for n in params}
    changed = {k for k, n in own.items() if not torch.equal(before[n], params[n].detach())}
    if changed != {str(k) for k in f("changed_keys")}:
        problems.append(f"changed keys differ: {sorted(changed ^ {str(k) for k in f('changed_keys')})[:4]}")
    if set(own) - changed != {str(k) for k in f("unchanged_keys")}:
        problems.append("unchanged keys differ")
    for i, k in enumerate(str(k) for k in f("changed_keys")):
        if k not in own:
            continue
        after = params[own[k]].detach().double().numpy()
        start = before[own[k]].numpy()
        per_elem = tol["step_sum_lr"] * lr + tol["step_sum_ulp"] * float(ulp32(np.abs(start).max()))
        worst["step_sum"].add(abs(after.sum() - float(f("param_sum_after_f64")[i])), after.size * per_elem, k)
        upd = float((after - start.astype(np.float64)).sum())
        worst["step_sum"].add(abs(upd - float(f("update_sum_f64")[i])), after.size * per_elem, k)
        if f"{name}/after_step/{k}" in fx:
            ref = f(f"after_step/{k}")
            bound = tol["step_elem_lr"] * lr + tol["step_elem_ulp"] * ulp32(ref)
            worst["step_elem"].add(float((np.abs(after - ref) / bound).max()), 1.0, k)

    return changed, problems


def check_recipe(name: str, model: R2Former, start: dict, fx: dict, tol: dict) -> dict:
    """Run the project's step for recipe ``name`` on the fixture's batch and compare. ``model`` is
    reset to the ``start`` weights first (one model serves every recipe)."""
    f = lambda k: fx[f"{name}/{k}"]   # noqa: E731
    recipe = get_recipe(name)
    problems: list[str] = []
    worst = {k: Worst() for k in ("loss", "parts", "logits", "grad_elem", "grad_sum", "grad_maxabs", "step_elem",
                                  "step_sum")}

    lr = epoch_lr(recipe, 0)
    problems += _check_schedule_and_layout(recipe, f, lr)
    triplets = f("triplet_index_per_negative")
    B = triplets.shape[1]
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
            p.grad = None
    names = prepare_model(model, recipe)
    own_opt = [official_name(n) for n in names]
    if own_opt != [str(k) for k in f("optimizer_param_keys")]:
        problems.append(f"optimizer tensors differ ({len(own_opt)} vs {len(f('optimizer_param_keys'))})")
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    grads: dict[str, torch.Tensor] = {}

    def capture(_params) -> None:    # where the all-reduce runs: one process, so only record
        grads.update({official_name(n): p.grad.detach().clone() for n, p in params.items() if p.grad is not None})

    images = normalize_images(torch.from_numpy(fx["image_pool"][f("batch_pool_index")]))
    batch = Batch(triplets=torch.from_numpy(triplets), global_batch=B, images=images)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], recipe, lr)
    t0 = time.perf_counter()
    out = step(model, batch, recipe, optimizer, reduce_gradients=capture)
    seconds = time.perf_counter() - t0

    problems += _compare_loss(out, f, tol, worst)
    problems += _compare_gradients(grads, f, fx, name, tol, worst)
    changed, after_problems = _compare_after_step(params, before, f, fx, name, tol, lr, worst)
    problems += after_problems

    fails = problems + [f"{c} ratio {w}" for c, w in worst.items() if not w.ratio <= 1.0]
    return {"recipe": name, "loss": out.loss, "loss_official": float(f("loss")),
            "loss_diff": abs(out.loss - float(f("loss"))), "lr": lr, "tensors_in_optimizer": len(names),
            "tensors_with_grad": len(grads), "changed": len(changed), "worst": {c: (w.ratio, w.key) for c, w in worst.items()},
            "step_seconds": seconds, "problems": fails, "ok": not fails}


def print_table(rows: list[dict]) -> None:
    print("| recipe | loss (project) | loss diff | lr | optimizer / grad / changed tensors | loss+parts | logits "
          "| grad elem | grad sum | grad max | step elem | step sum | step s | pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = r["worst"]
        fmt = lambda c, w=w: f"{w[c][0]:.3g}"   # noqa: E731
        print(f"| {r['recipe']} | {r['loss']:.9f} | {r['loss_diff']:.1e} | {r['lr']:.3g} | "
              f"{r['tensors_in_optimizer']} / {r['tensors_with_grad']} / {r['changed']} | "
              f"{max(w['loss'][0], w['parts'][0]):.3g} | {fmt('logits')} | {fmt('grad_elem')} | {fmt('grad_sum')} | "
              f"{fmt('grad_maxabs')} | {fmt('step_elem')} | {fmt('step_sum')} | {r['step_seconds']:.1f} | "
              f"{'yes' if r['ok'] else 'NO'} |")
    print("(ratios: worst difference / the fixture's tolerance over all keys; pass needs every ratio <= 1 and "
          "the key sets, optimizer tensors and learning-rate schedule equal)")
    for r in rows:
        w = r["worst"]
        print(f"{r['recipe']}: worst keys: grad elem {w['grad_elem'][1]}, grad sum {w['grad_sum'][1]}, "
              f"step elem {w['step_elem'][1]}, step sum {w['step_sum'][1]}")
        for p in r["problems"]:
            print(f"  FAIL {r['recipe']}: {p}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE, help="folder of an official training-step fixture")
    ap.add_argument("--recipes", nargs="*", help="only these recipes (default: every recipe of the fixture)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fx, report, configs = load_fixture(args.fixture)
    size = tuple(int(s) for s in fx["resize_hw"])
    model = start_model(args.fixture, int(fx["seed"]), size)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [check_recipe(name, model, start, fx, report["tolerances"]) for name in configs
            if not args.recipes or name in args.recipes]
    print(f"fixture {args.fixture} (seed {int(fx['seed'])}, {size[0]}x{size[1]}, recipes {', '.join(configs)})")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
