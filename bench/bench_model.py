"""R²Former model benchmark: extraction and reranking speed, reranking memory.

Prints, from one run on this machine:
- extraction images/s at 480 x 640 (CPU float32 unless a GPU is present), the FLOPs of one image
  counted with ``torch.utils.flop_counter.FlopCounterMode`` and the GFLOP/s achieved, next to a
  plain ``torch.matmul`` GFLOP/s measured in the same run;
- reranking pairs/s and the time to rerank 100 candidates for one query;
- peak memory of reranking 100 candidates, measured in a fresh subprocess that holds only the
  reranker and the tokens (``ru_maxrss`` after minus before);
- an official-style reranker on the same tokens (the release's full 7-channel matrix, argsorts
  and repeats, written out here) on a few pairs, scaled to 100, with its memory, for a same-run
  speed ratio; and how far the logits of the two differ;
- how far float16 storage of the local tokens moves the logits.

Weights are the parity fixture's formula weights and the tokens are the fixture's official local
features (row-permuted copies make 100 candidates), so the figures are for real token statistics.

    .venv/bin/python bench/bench_model.py [--threads 2] [--pairs 100] [--baseline-pairs 8] [--no-baseline]
    .venv/bin/python bench/bench_model.py --smoke    # 1 image at 128x160, 4 pairs at T = 64, 256^2 matmul
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PARITY = Path(os.environ.get("R2F_SHARED", ROOT.parent / "shared")) / "parity" / "r2former_official_seed0"


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    return 2 * n ** 3 / _best(lambda: torch.matmul(a, b), repeat) / 1e9


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def attention_flops(model, images: torch.Tensor) -> int:
    """QK^T and AV of every backbone block (CPU SDPA kernels are not in FlopCounterMode's table)."""
    B, _, H, W = images.shape
    L = 2 + (H // 16) * (W // 16)
    blocks = model.backbone.blocks
    return len(blocks) * 2 * 2 * B * L * L * model.backbone.embed_dim


def load_model():
    from pipeline.model import R2Former
    from pipeline.model import checkpoint as ck
    sd = ck.formula_state_dict(PARITY / "keys.tsv", seed=0, verify=False)
    return R2Former._from_official_state_dict({"module." + k: v for k, v in sd.items()}, None)


def load_reranker():
    """Only the reranker (formula weights), so the memory child holds nothing else."""
    from pipeline.model import checkpoint as ck
    from pipeline.model.reranker import RerankTransformer
    sd, _ = ck.checkpoint_filter_fn(ck.formula_state_dict(PARITY / "keys.tsv", seed=0, verify=False,
                                                          prefix="Reranker."))
    rr = RerankTransformer()
    rr.load_state_dict({k[len("reranker."):]: v for k, v in sd.items() if k.startswith("reranker.")})
    return rr.eval()


def candidate_tokens(n: int, seed: int = 0, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's query image 0 tokens and ``n`` candidates: its 4 token sets, rows shuffled.
    ``tokens``: only the first (best-attended) T rows of each set, what a ``num_local = T`` model keeps."""
    lf = torch.from_numpy(np.load(PARITY / "fixture.npz")["local_features"])[:, :tokens]
    g = torch.Generator().manual_seed(seed)
    cands = torch.stack([lf[i % 4][torch.randperm(lf.shape[1], generator=g)] for i in range(n)])
    return lf[0:1].expand(n, -1, -1).contiguous(), cands


# ---------------------------------------------------------------------------- official-style reranker
def official_style_logits(rr, x_rerank: torch.Tensor, y_rerank: torch.Tensor) -> torch.Tensor:
    """The release's reranker forward, step for step (full (P, N, M, 7) matrix, two full argsorts
    with 7-channel repeats, the unused flipped copy), on our module's weights."""
    from pipeline.model.reranker import sincos_embed_2d
    B, N, _ = x_rerank.shape
    k = rr.num_corr
    xt = F.normalize(x_rerank[:, :, 3:], p=2, dim=2)
    yt = F.normalize(y_rerank[:, :, 3:], p=2, dim=2)
    xc = x_rerank[:, :, :3].clamp(0, 1)
    yc = y_rerank[:, :, :3].clamp(0, 1)
    corr = torch.matmul(xt, yt.permute(0, 2, 1))
    xy = torch.cat([xc.unsqueeze(2).repeat(1, 1, yt.shape[1], 1), yc.unsqueeze(1).repeat(1, xt.shape[1], 1, 1),
                    corr.unsqueeze(3)], dim=3)
    order_q = torch.argsort(corr.unsqueeze(3), dim=2, descending=True).repeat(1, 1, 1, 7)
    order_k = torch.argsort(corr.unsqueeze(3), dim=1, descending=True).repeat(1, 1, 1, 7)
    sel_q = torch.gather(xy, 2, order_q[:, :, :k, :])
    sel_k = torch.gather(xy, 1, order_k[:, :k, :, :])
    sel_k_copy = sel_k.clone()
    sel_k_copy[:, :, :, :6] = torch.flip(sel_k[:, :, :, :6].reshape(*sel_k.shape[:3], 2, 3), dims=(3,)).reshape(
        *sel_k.shape[:3], 6)
    sel = torch.cat([sel_q, sel_k.permute(0, 2, 1, 3)], dim=1)
    sel_copy = torch.cat([sel_q, sel_k.permute(0, 2, 1, 3)], dim=1)
    ns = sel.shape[1]
    pm = rr.pair_head(sel.reshape(B * ns * k, 7)).reshape(B * ns, k, rr.embed_dim)
    pm = pm + sincos_embed_2d(sel_copy.reshape(B * ns, k, 7)[:, :, 3:5], rr.embed_dim)
    x = torch.cat([rr.cls_token_2.repeat(B * ns, 1, 1), pm], dim=1)
    for blk in rr.blocks_2:
        x = blk(x)
    x = rr.decoder_norm(x)
    x = rr.pair_head_2(x[:, 0]).reshape(B, ns, rr.embed_dim) + sincos_embed_2d(sel_copy[:, :, 0, 0:2], rr.embed_dim)
    x = torch.cat([rr.cls_token.repeat(B, 1, 1), x], dim=1)
    for blk in rr.blocks:
        x = blk(x)
    return rr.decoder_pred(rr.decoder_norm(x)[:, 0])


# ---------------------------------------------------------------------------- memory (subprocess)
def _memory_child(pairs: int, threads: int, style: str, tokens: int | None) -> None:
    torch.set_num_threads(threads)
    rr = load_reranker()
    if style == "official":
        # timm 0.5.4 (the release's) attention: explicit softmax(q k^T) matrices, no fused kernel
        for blk in [*rr.blocks, *rr.blocks_2]:
            blk.attn.fused_attn = False
    q, c = candidate_tokens(pairs, tokens=tokens)
    with torch.no_grad():       # warm-up on 2 pairs so one-time allocations are not counted
        (official_style_logits(rr, q[:2], c[:2]) if style == "official" else rr(q[:2], c[:2]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = _RssSampler()
    t, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = official_style_logits(rr, q, c) if style == "official" else rr(q, c)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    sampled = sampler.stop()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after, "maxrss_delta_mib": (after - before) / 1024,
                      "sampled_delta_mib": sampled, "delta_mib": max((after - before) / 1024, sampled),
                      "peak_mib": after / 1024, "seconds": seconds, "cpu_seconds": cpu, "pairs": pairs,
                      "logits": out.tolist()}))


class _RssSampler:
    """Peak of the current RSS (``/proc/self/statm``) over a run, minus the RSS at its start:
    unlike ``ru_maxrss`` it is not hidden by an earlier transient peak."""

    def __init__(self, every_s: float = 0.002):
        import threading
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start_rss = self._rss()
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return (self.peak - self.start_rss) / 2 ** 20


def memory_run(pairs: int, threads: int, style: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", style, "--pairs", str(pairs),
                          "--threads", str(threads), "--tokens", str(tokens)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("R2F_TORCH_THREADS", "0")) or os.cpu_count())
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4, help="images per extraction batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline-pairs", type=int, default=8, help="pairs for the official-style reranker")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--tokens", type=int, default=500, help="tokens per side (the fixture's first T rows)")
    ap.add_argument("--image-size", default="480,640", help="H,W of the extraction images (multiples of 16)")
    ap.add_argument("--matmul", type=int, default=2048, help="side of the reference torch.matmul")
    ap.add_argument("--smoke", action="store_true", help="the smallest setting (tests/test_bench_scripts.py)")
    ap.add_argument("--memory-child", choices=["ours", "official"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.pairs, args.batch, args.repeat, args.baseline_pairs = 4, 1, 1, 2
        args.tokens, args.image_size, args.matmul = 64, "128,160", 256
    if args.memory_child:
        return _memory_child(args.pairs, args.threads, args.memory_child, args.tokens)
    H, W = (int(v) for v in args.image_size.split(","))

    from pipeline.device import choose_device
    from pipeline.model import normalize_images

    torch.set_num_threads(args.threads)
    plan = choose_device("auto")
    print(f"threads {torch.get_num_threads()}, device {plan.device}, autocast {plan.autocast_dtype}, "
          f"load average {os.getloadavg()[0]:.1f}")
    model = load_model().place(plan)

    # --- extraction
    u8 = torch.from_numpy(np.load(PARITY / "fixture.npz")["images"])
    images = normalize_images(u8.repeat((args.batch + 3) // 4, 1, 1, 1)[:args.batch])
    if (H, W) != tuple(images.shape[2:]):
        images = F.interpolate(images, size=(H, W), mode="bilinear", align_corners=False)
    model.extract(images)
    flops = count_flops(lambda: model.extract(images[:1])) + attention_flops(model, images[:1])
    sec = _best(lambda: model.extract(images), args.repeat)
    mm = matmul_gflops(args.matmul)
    print(f"extraction {H}x{W}: {args.batch / sec:.2f} images/s ({sec / args.batch * 1000:.0f} ms/image), "
          f"{flops / 1e9:.1f} GFLOP/image -> {flops * args.batch / sec / 1e9:.0f} GFLOP/s achieved; "
          f"plain torch.matmul {args.matmul}^2: {mm:.0f} GFLOP/s ({flops * args.batch / sec / 1e9 / mm:.0%})")

    # --- reranking speed
    q, c = candidate_tokens(args.pairs, tokens=args.tokens)
    model.rerank_logits(q[:4], c[:4])
    sec = _best(lambda: model.rerank_logits(q, c), args.repeat)
    logits = model.rerank_logits(q, c)
    print(f"reranking: {args.pairs / sec:.1f} pairs/s; {args.pairs} candidates for one query in {sec:.2f} s "
          f"(T = {q.shape[1]} tokens each side)")

    # --- float16 token storage
    half = model.rerank_logits(q.half().float(), c.half().float())
    p = logits.softmax(1)[:, 1]
    ph = half.softmax(1)[:, 1]
    print(f"float16 token storage: logits move by at most {(half - logits).abs().max().item():.2e} "
          f"(match score by {(ph - p).abs().max().item():.2e}) over {args.pairs} pairs")

    # --- memory, our reranker
    ours = memory_run(args.pairs, args.threads, "ours", args.tokens)
    print(f"memory, rerank {args.pairs} candidates (fresh process): +{ours['delta_mib']:.0f} MiB over the "
          f"loaded state (sampled RSS +{ours['sampled_delta_mib']:.0f}, ru_maxrss +{ours['maxrss_delta_mib']:.0f}; "
          f"process peak RSS {ours['peak_mib']:.0f} MiB, of which ~600 MiB is importing torch), "
          f"{ours['seconds']:.2f} s wall, {ours['cpu_seconds']:.2f} s CPU")

    if not args.no_baseline:
        n = args.baseline_pairs
        base = memory_run(n, args.threads, "official", args.tokens)
        scaled = base["seconds"] * args.pairs / n
        diff = np.abs(np.array(base["logits"]) - logits[:n].numpy()).max()
        cpu_ratio = base["cpu_seconds"] * args.pairs / n / ours["cpu_seconds"]
        print(f"official-style reranker, {n} pairs: {base['seconds']:.2f} s wall, {base['cpu_seconds']:.2f} s CPU, "
              f"+{base['delta_mib']:.0f} MiB -> {scaled:.1f} s and ~{base['delta_mib'] * args.pairs / n / 1024:.1f} GiB "
              f"for {args.pairs} in one batch (linear scaling); ours is {scaled / ours['seconds']:.1f}x faster in wall "
              f"time (fresh processes), {cpu_ratio:.1f}x in CPU time; max logit difference {diff:.1e}")
    print("reference (issue 2): official reranker ~31 s and ~8 GB for 100 pairs, extraction ~1.2 s/image "
          "on these 2 cores")


if __name__ == "__main__":
    main()
