"""R²Former against the official release code, side by side in one run on the same weights and inputs.

Prints, with the load average beside every figure:
- reranker: seconds for P pairs (P = 20, 100) at T = 500, 128, 64 tokens per side, the official
  ``R2Former`` reranker (model/R2Former.py, timm 0.5.4) against ``RerankTransformer`` (ours, whose
  default is PyTorch's fused SDPA, and ours with the opt-in per-head exp2 CPU attention), the ratio and the max
  logit difference; then a per-phase profile of ours with each phase's achieved GFLOP/s;
- extraction at 480 x 640: images/s of the official ``GeoLocalizationNetRerank.forward_deit``
  and of ``R2Former.extract``, the max global-descriptor / local-feature differences, our achieved
  GFLOP/s beside a 2048² float32 ``torch.matmul`` in this process (same threads, best of 5);
- parameters and GFLOPs of our backbone, reranker and EfficientNet-Lite0 + GeM, at 480 x 640
  (the size that reproduces the supplementary table 3 ViT-Small figure) and 224 x 224.

Fair on both sides: same thread count, eval mode under no_grad, float32, the same batches (the
official code gets each batch whole, ours its default chunking), 2 warm-ups, then the median of
``--repeats`` runs alternating official / ours (the official code runs in a child process, in its
own venv, that answers one command per line, so both see the same load). No ``torch.compile``
is used by ours (nothing to report separately). Weights are the parity fixture's formula
weights (../shared/parity), written to a temporary state_dict file; tokens are the fixture's
official local features (row-permuted copies make P candidates), images its 4 GardensPoint frames.

The official code is not part of this project and is never fetched here. Set it up once, outside
the project:

    git clone https://github.com/bytedance/R2Former /work/official/R2Former    # or any path
    python3 -m venv /work/official/venv
    /work/official/venv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==0.5.4 numpy pillow tqdm einops pandas

    .venv/bin/python bench/bench_official.py --official /work/official/R2Former \\
        [--official-python /work/official/venv/bin/python] [--threads 2] [--repeats 5] \\
        [--pairs 20,100] [--tokens 500,128,64] [--skip-extract] [--skip-sizes]

``--official`` defaults to $R2F_OFFICIAL_DIR, the interpreter to $R2F_OFFICIAL_PYTHON or
<checkout>/../venv/bin/python. Without a checkout (or its interpreter) the script says so, skips
every official figure and runs the project side alone: our reranker's seconds (SDPA and blocked)
with the per-phase profile, and the parameter / GFLOP table.

    .venv/bin/python bench/bench_official.py --smoke    # T = 64, 2 pairs, 1 run; sizes at 224 x 224 only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PARITY = Path(os.environ.get("R2F_SHARED", ROOT.parent / "shared")) / "parity" / "r2former_official_seed0"
TABLE3 = {"ViT-Small": (22.2, 25.9), "ResNet+GeM": (23.5, 25.2)}   # M parameters, GFLOPs


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load {a:.2f}/{b:.2f}/{c:.2f}"


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


class Official:
    """The official code in its own interpreter, one timed command per stdin line."""

    def __init__(self, python: str, checkout: Path, state_dict: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([python, str(ROOT / "bench" / "official_child.py"), str(checkout),
                                      str(state_dict), str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(checkout))
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the official child exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def run(self, **cmd) -> float:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def alternate(contestants: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per contestant; each repeat runs every contestant once, in turn."""
    for _ in range(warmup):
        for fn in contestants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in contestants}
    for _ in range(repeats):
        for name, fn in contestants.items():
            times[name].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn):
    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return run


# ---------------------------------------------------------------------------- model and inputs
def formula_weights() -> dict[str, torch.Tensor]:
    from pipeline.model import checkpoint as ck
    return ck.formula_state_dict(PARITY / "keys.tsv", seed=0, verify=False)


def our_model(sd):
    from pipeline.model import R2Former
    return R2Former._from_official_state_dict({"module." + k: v for k, v in sd.items()}, None)


def token_sets(pairs: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Query image 0's top-``tokens`` official tokens against ``pairs`` candidates (the 4 images'
    token sets, rows shuffled). The first T rows are the T best-attended patches, i.e. what a
    ``num_local = T`` model selects."""
    lf = torch.from_numpy(np.load(PARITY / "fixture.npz")["local_features"])[:, :tokens]
    g = torch.Generator().manual_seed(seed)
    cands = torch.stack([lf[i % 4][torch.randperm(tokens, generator=g)] for i in range(pairs)])
    return lf[0:1].expand(pairs, -1, -1).contiguous(), cands


def rerank_flops(T: int, k: int = 5, C: int = 32, heads: int = 4, depth: int = 6) -> dict[str, float]:
    """Multiply-adds x 2 of one pair with T tokens per side, by phase (what the math needs)."""
    S, L, L1 = 2 * T, 2 * T + 1, k + 1
    lin_full = 2 * (C * 3 * C + C * C + 2 * C * 4 * C)          # per token: qkv, proj, mlp
    corr = 2 * T * T * 128
    lvl1 = S * (L1 * lin_full + 2 * 2 * L1 * L1 * C                # block 1, all 6 tokens
                + L1 * 2 * C * 3 * C + 2 * (C * C + 2 * C * 4 * C) + 2 * 2 * L1 * C   # block 2, token 0
                + 2 * C * C)                                       # pair_head_2
    lvl2_attn = (depth - 1) * 2 * 2 * L * L * C + 2 * 2 * L * C
    lvl2_rest = (depth - 1) * L * lin_full + L * 2 * C * 3 * C + 2 * (C * C + 2 * C * 4 * C)
    return {"correlation + top-5": corr, "level 1 (2 blocks x 6 tokens x 2T)": lvl1,
            "level 2 attention": lvl2_attn, "level 2 linear + MLP": lvl2_rest}


def phase_profile(rr, q, c, repeats: int) -> None:
    """Seconds per phase of ours (wrapping its level and attention helpers), with achieved GFLOP/s."""
    import pipeline.model.reranker as R
    spent = {"level 1": 0.0, "level 2 attention": 0.0, "level 2": 0.0}
    orig_encode, orig_attn = R.RerankTransformer._encode, R._self_attention

    def encode(self, x, cls, blocks):
        t = time.perf_counter()
        out = orig_encode(self, x, cls, blocks)
        spent["level 1" if blocks is self.blocks_2 else "level 2"] += time.perf_counter() - t
        return out

    def attn(qkv, *a, **kw):
        t = time.perf_counter()
        out = orig_attn(qkv, *a, **kw)
        if qkv.shape[1] >= R._LONG_SEQ:
            spent["level 2 attention"] += time.perf_counter() - t
        return out

    R.RerankTransformer._encode, R._self_attention = encode, attn
    try:
        total = 0.0
        with torch.no_grad():
            for _ in range(repeats):
                t = time.perf_counter()
                rr(q, c)
                total += time.perf_counter() - t
    finally:
        R.RerankTransformer._encode, R._self_attention = orig_encode, orig_attn
    P, T = q.shape[:2]
    fl = {k: v * P for k, v in rerank_flops(T).items()}
    secs = {"correlation + top-5": total - spent["level 1"] - spent["level 2"],
            "level 1 (2 blocks x 6 tokens x 2T)": spent["level 1"],
            "level 2 attention": spent["level 2 attention"],
            "level 2 linear + MLP": spent["level 2"] - spent["level 2 attention"]}
    print(f"  per-phase profile of ours, {P} pairs, T = {T} (mean of {repeats} runs, {load()}):")
    for k in fl:
        s = secs[k] / repeats
        print(f"    {k:38s} {s:7.3f} s  {fl[k] / 1e9:7.2f} GFLOP  {fl[k] / max(s, 1e-9) / 1e9:6.1f} GFLOP/s")
    print(f"    {'total':38s} {total / repeats:7.3f} s  {sum(fl.values()) / 1e9:7.2f} GFLOP")


# ---------------------------------------------------------------------------- sections
def bench_rerank_ours(model, pairs: list[int], tokens: list[int], warmup: int, repeats: int, profile: bool) -> None:
    """Our side of ``bench_rerank`` alone (no official checkout): SDPA and blocked attention."""
    print("\n== reranker, ours only (bench/bench_official.py; no official checkout): seconds for P pairs, "
          f"median of {repeats} alternating runs after {warmup} warm-ups, float32, no_grad ==")
    print(f"{'T':>4} {'P':>4} {'ours s':>8} {'ours-blocked s':>14}  load")
    rr = model.reranker.eval()
    for T in tokens:
        for P in pairs:
            q, c = token_sets(P, T)
            ours = timed(lambda q=q, c=c: model.rerank_logits(q, c))

            def blocked_run(ours=ours):
                rr.cpu_attention = "blocked"
                try:
                    return ours()
                finally:
                    rr.cpu_attention = "sdpa"
            med = alternate({"ours": ours, "ours-blocked": blocked_run}, warmup, repeats)
            print(f"{T:>4} {P:>4} {med['ours']:>8.3f} {med['ours-blocked']:>14.3f}  {load()}", flush=True)
    if profile:
        q, c = token_sets(min(pairs), max(tokens))
        phase_profile(rr, q, c, max(3, repeats // 2))


def bench_rerank(official: Official, model, tmp: Path, pairs: list[int], tokens: list[int],
                 warmup: int, repeats: int, profile: bool) -> None:
    print("\n== reranker (bench/bench_official.py): seconds for P pairs, median of "
          f"{repeats} alternating runs after {warmup} warm-ups, float32, no_grad ==")
    print(f"{'T':>4} {'P':>4} {'official s':>11} {'ours s':>8} {'ratio':>7} {'ours-blocked s':>14} {'ratio':>7} "
          f"{'max|dlogit|':>12}  load")
    rr = model.reranker.eval()
    worst = None
    for T in tokens:
        for P in pairs:
            q, c = token_sets(P, T)
            qp, cp, op = tmp / f"q_{T}_{P}.npy", tmp / f"c_{T}_{P}.npy", tmp / f"logits_{T}_{P}.npy"
            np.save(qp, q.numpy())
            np.save(cp, c.numpy())
            official.run(op="rerank", q=str(qp), c=str(cp), out=str(op))
            ours = model.rerank_logits(q, c)
            diff = float((torch.from_numpy(np.load(op)) - ours).abs().max())

            ours_run = timed(lambda q=q, c=c: model.rerank_logits(q, c))

            def blocked_run(ours_run=ours_run):
                rr.cpu_attention = "blocked"
                try:
                    return ours_run()
                finally:
                    rr.cpu_attention = "sdpa"
            med = alternate({"official": lambda qp=qp, cp=cp: official.run(op="rerank", q=str(qp), c=str(cp)),
                             "ours": ours_run, "ours-blocked": blocked_run}, warmup, repeats)
            ratio = med["official"] / med["ours"]
            print(f"{T:>4} {P:>4} {med['official']:>11.3f} {med['ours']:>8.3f} {ratio:>6.1f}x "
                  f"{med['ours-blocked']:>14.3f} {med['official'] / med['ours-blocked']:>6.1f}x {diff:>12.2e}  {load()}",
                  flush=True)
            if T == max(tokens) and (worst is None or ratio < worst[0]):
                worst = (ratio, P)
    if profile and worst is not None:
        q, c = token_sets(min(pairs), max(tokens))
        phase_profile(rr, q, c, max(3, repeats // 2))


def _rows_by_patch(local: np.ndarray) -> np.ndarray:
    """Rows of one image's tokens sorted by patch position (x, y columns), so that near-tied
    attention ranks do not misalign the comparison."""
    key = np.round(local[:, 1] * 1e4) * 1e5 + np.round(local[:, 0] * 1e4)
    return local[np.argsort(key, kind="stable")]


def bench_extract(official: Official, model, tmp: Path, batch: int, warmup: int, repeats: int) -> None:
    from bench_model import attention_flops, count_flops

    from pipeline.model import normalize_images
    u8 = torch.from_numpy(np.load(PARITY / "fixture.npz")["images"])
    images = normalize_images(u8[torch.arange(batch) % len(u8)]).contiguous()
    ip, op = tmp / "images.npy", tmp / "extract.npz"
    np.save(ip, images.numpy())
    official.run(op="extract", images=str(ip), out=str(op))
    ref = np.load(op)
    ours = model.extract(images)
    dg = float(np.abs(ours.global_descriptor.numpy() - ref["global_desc"]).max())
    dl = max(float(np.abs(_rows_by_patch(a) - _rows_by_patch(b)).max())
             for a, b in zip(ours.local_tokens.numpy(), ref["local_features"]))
    med = alternate({"official": lambda: official.run(op="extract", images=str(ip)),
                     "ours": timed(lambda: model.extract(images))}, warmup, repeats)
    flops = count_flops(lambda: model.extract(images[:1])) + attention_flops(model, images[:1])
    mm = matmul_gflops()
    ips_o, ips = batch / med["official"], batch / med["ours"]
    achieved = flops * ips / 1e9
    print(f"\n== extraction 480 x 640, batch {batch} (bench/bench_official.py), median of {repeats} "
          f"alternating runs ==")
    print(f"official {ips_o:.2f} images/s   ours {ips:.2f} images/s   ratio {ips / ips_o:.2f}x   {load()}")
    print(f"ours: {flops / 1e9:.1f} GFLOP/image -> {achieved:.0f} GFLOP/s achieved; plain torch.matmul 2048^2 "
          f"in this process: {mm:.0f} GFLOP/s ({achieved / mm:.0%})   {load()}")
    print(f"max |global descriptor difference| {dg:.2e}; max |local feature difference| (rows by patch) {dl:.2e}")


def _count(fn) -> tuple[float, float]:
    """(Linear + Conv multiply-adds, everything FlopCounterMode sees) in G, from one call of ``fn``."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    ops = counter.get_flop_counts()["Global"]
    layers = sum(v for k, v in ops.items() if str(k).split(".")[1] in ("addmm", "mm", "convolution"))
    return layers / 2e9, sum(ops.values()) / 1e9


def bench_sizes(model, sizes=((480, 640), (224, 224))) -> None:
    from bench_model import attention_flops

    from pipeline.model.efficientnet import EfficientNetLite0VPR
    eff = EfficientNetLite0VPR().eval()
    mparams = lambda m: sum(p.numel() for p in m.parameters()) / 1e6   # noqa: E731
    print("\n== model size (bench/bench_official.py); GMAC = Linear + Conv multiply-accumulates (what "
          "module-hook counters report as 'FLOPs'), GFLOP = all counted operations x 2 incl. attention ==")
    print("supplementary table 3: " + "; ".join(f"{k} {p} M / {f} GFLOPs" for k, (p, f) in TABLE3.items()))
    for H, W in sizes:
        x = torch.zeros(1, 3, H, W)
        from pipeline.model import R2Former
        m = R2Former(img_size=(H, W), init_weights=False).eval()
        m.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("pos_embed")},
                          strict=False)
        bb_mac, bb_all = _count(lambda m=m, x=x: m.backbone(x))
        att = attention_flops(m, x) / 1e9
        e_mac, e_all = _count(lambda x=x: eff.backbone.forward_features(x))
        print(f"{H} x {W}: R2Former backbone (DeiT-S distilled, 256-d heads) {mparams(m.backbone):.1f} M params, "
              f"{bb_mac:.1f} GMAC, {bb_all + att:.1f} GFLOP with attention; local head "
              f"{mparams(m.local_head) * 1e3:.0f} k params; EfficientNet-Lite0 + GeM {mparams(eff.backbone):.1f} M "
              f"params, {e_mac:.2f} GMAC")
    q, c = token_sets(1, 500)
    fl = sum(rerank_flops(500).values()) / 1e9
    print(f"R2Former reranker: {mparams(model.reranker) * 1e3:.0f} k params, {fl:.2f} GFLOP per pair at T = 500 "
          f"(of which level-2 attention {rerank_flops(500)['level 2 attention'] / 1e9:.2f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", default=os.environ.get("R2F_OFFICIAL_DIR"), help="official checkout")
    ap.add_argument("--official-python", default=os.environ.get("R2F_OFFICIAL_PYTHON"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", default="20,100")
    ap.add_argument("--tokens", default="500,128,64")
    ap.add_argument("--extract-batch", type=int, default=4)
    ap.add_argument("--skip-rerank", action="store_true")
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--skip-sizes", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the smallest setting (tests/test_bench_scripts.py)")
    args = ap.parse_args()
    sizes = ((480, 640), (224, 224))
    if args.smoke:
        args.pairs, args.tokens, args.warmup, args.repeats, args.extract_batch = "2", "64", 0, 1, 1
        sizes = ((224, 224),)
    pairs, tokens = [int(p) for p in args.pairs.split(",")], [int(t) for t in args.tokens.split(",")]
    sys.path.insert(0, str(ROOT / "bench"))
    torch.set_num_threads(args.threads)
    python, missing = official_side(args)
    if missing:
        print(f"{missing}; official side skipped, running the project side only "
              f"(see this script's docstring to set the official code up)", flush=True)
        model = our_model(formula_weights())
        if not args.skip_rerank:
            bench_rerank_ours(model, pairs, tokens, args.warmup, args.repeats, not args.no_profile)
        if not args.skip_sizes:
            bench_sizes(model, sizes)
        return 0
    checkout = Path(args.official)
    sd = formula_weights()
    model = our_model(sd)
    with tempfile.TemporaryDirectory(prefix="bench_official_") as d:
        tmp = Path(d)
        torch.save(sd, tmp / "state_dict.pth")      # official names, no DataParallel "module." prefix
        official = Official(python, checkout, tmp / "state_dict.pth", args.threads)
        try:
            print(f"ours: torch {torch.__version__}, {torch.get_num_threads()} threads; official: "
                  f"torch {official.info['torch']}, timm {official.info['timm']}, {official.info['threads']} threads "
                  f"(stubbed unused imports: {', '.join(official.info['stubbed']) or 'none'}); "
                  f"torch.compile: not used; {load()}")
            if not args.skip_rerank:
                bench_rerank(official, model, tmp, pairs, tokens, args.warmup, args.repeats, not args.no_profile)
            if not args.skip_extract:
                bench_extract(official, model, tmp, args.extract_batch, args.warmup, args.repeats)
        finally:
            official.close()
    if not args.skip_sizes:
        bench_sizes(model, sizes)
    return 0


def official_side(args) -> tuple[str | None, str | None]:
    """(interpreter of the official venv, None), or (None, why the official side cannot run)."""
    checkout = Path(args.official) if args.official else None
    if checkout is None or not (checkout / "model" / "R2Former.py").is_file():
        return None, f"official R2Former checkout not found ({checkout or 'set --official or R2F_OFFICIAL_DIR'})"
    python = args.official_python or str(checkout.parent / "venv" / "bin" / "python")
    if not Path(python).exists():
        return None, f"official venv interpreter {python} not found (pass --official-python)"
    return python, None


if __name__ == "__main__":
    sys.exit(main())
