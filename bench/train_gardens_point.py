"""Train the reranker on Gardens Point and measure what it adds over global retrieval.

Protocol (issue 6): EfficientNet-Lite0 tokens at 272x480 (frozen backbone, so the stage-2
stored-token path applies); train on places 0-99 with day_right queries against the day_left
database (global hardest negatives mined by ``r2f mine``, soft-positive radius 2 frames); test on
places 100-199, database day_right, queries night_right, tolerance 2 frames. Prints recall@1/5/10
of global retrieval alone, of the untrained reranker and of the trained reranker over the global
top-K candidates for several K.

    .venv/bin/python bench/train_gardens_point.py [--work /tmp/gp_train] [--epochs 30]

Runs the real pipeline: Ray Data extraction, Ray mining, Ray Train (2 CPU workers, gloo); Ray is the
cluster named by ``RAY_ADDRESS`` when set, else a local one.

    .venv/bin/python bench/train_gardens_point.py --smoke

``--smoke``: every step at the smallest size, in a temporary ``--work``: train and test on places
0-7 (the test database is then the training queries' store, extracted once), 128x224 images,
top-2/4 candidates, one training step on one Ray Train worker.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gp_common  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.datasets import load_dataset  # noqa: E402
from pipeline.extract import ExtractConfig, extract_dataset  # noqa: E402
from pipeline.mine import MineConfig  # noqa: E402
from pipeline.mine import run as mine
from pipeline.model import EfficientNetLite0VPR  # noqa: E402
from pipeline.train import DataConfig, TrainConfig, read_state  # noqa: E402
from pipeline.train import run as train

SIZE = (272, 480)
TOL = 2.0
KS = (1, 5, 10)
TRAIN_PLACES, TEST_PLACES = (0, 100), (100, 200)
MINE_TOP, TRAIN_BATCH, TRAIN_WORKERS, MAX_STEPS = 100, 16, 2, 0


def smoke_settings(args) -> None:
    """The smallest setting that still runs every step (see the module docstring)."""
    global SIZE, TRAIN_PLACES, TEST_PLACES, MINE_TOP, TRAIN_BATCH, TRAIN_WORKERS, MAX_STEPS
    SIZE, TRAIN_PLACES, TEST_PLACES = (128, 224), (0, 8), (0, 8)
    MINE_TOP, TRAIN_BATCH, TRAIN_WORKERS, MAX_STEPS = 4, 2, 1, 1
    args.epochs, args.candidates = 1, "2,4"


def subset(folder: Path, lo: int, hi: int):
    t = load_dataset(f"sequence:{folder}")
    east = t.column("utm_east")
    return t.filter(pc.and_(pc.greater_equal(east, lo), pc.less(east, hi)))


def extract(work: Path, data: Path) -> dict[str, str]:
    cfg = ExtractConfig(backbone="efficientnet-lite0", image_size=SIZE, batch_size=16, shard_size=64,
                        chunk_rows=16, progress=False, num_actors=1, threads_per_actor=2)
    stores, made = {}, {}
    for name, folder, (lo, hi) in [("train_db", "day_left", TRAIN_PLACES), ("train_q", "day_right", TRAIN_PLACES),
                                   ("test_db", "day_right", TEST_PLACES), ("test_q", "night_right", TEST_PLACES)]:
        if (folder, lo, hi) in made:  # the same images (--smoke): their store is extracted once
            stores[name] = stores[made[folder, lo, hi]]
            print(f"extract {name}: the {made[folder, lo, hi]} store ({folder}[{lo}:{hi}])", flush=True)
            continue
        made[folder, lo, hi] = name
        stores[name] = str(work / name)
        t0 = time.perf_counter()
        res = extract_dataset(subset(data / folder, lo, hi), stores[name], cfg, source=f"{folder}[{lo}:{hi}]")
        print(f"extract {name}: {res.num_extracted} images, skipped shards {res.skipped_shards}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return stores


def load_split(store: str):
    t = storage.read_global_table(store, ["row", "utm_east", "global_descriptor"])
    rows = t.column("row").to_numpy()
    return (t.column("utm_east").to_numpy().astype(np.float64), storage.descriptors_of(t),
            storage.read_local_tokens(store, rows))


def recalls(ranked: np.ndarray, q_pos: np.ndarray, db_pos: np.ndarray) -> dict[int, float]:
    hit = np.abs(db_pos[ranked] - q_pos[:, None]) <= TOL
    return {k: float(100 * hit[:, :k].any(1).mean()) for k in KS}


def rerank_scores(model, q_tok: np.ndarray, db_tok: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Match probability of every (query, candidate) pair in ``cand`` (Q, K)."""
    out = np.zeros(cand.shape, np.float32)
    with torch.no_grad():
        for i in range(len(cand)):
            q = torch.from_numpy(q_tok[i:i + 1]).expand(cand.shape[1], -1, -1)
            c = torch.from_numpy(db_tok[cand[i]])
            out[i] = model.rerank_logits(q, c).softmax(1)[:, 1].numpy()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gardens_point"))
    ap.add_argument("--work", default="/tmp/r2f_gp_train")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--candidates", default="5,10,20")
    ap.add_argument("--positive-radius", type=float, default=1.0)
    ap.add_argument("--smoke", action="store_true",
                    help="every step at the smallest size, in a temporary --work (tests/test_bench_scripts.py)")
    args = ap.parse_args()
    return gp_common.run_maybe_smoke(args, experiment, smoke_settings, "gp_train_smoke_")


def experiment(args) -> int:
    work, data = gp_common.start(args)
    t_all = time.perf_counter()

    stores = extract(work, data)
    t0 = time.perf_counter()
    m = mine(MineConfig(queries=stores["train_q"], database=stores["train_db"], output=str(work / "mined"),
                        soft_positive_radius=TOL, top_k=MINE_TOP))
    print(f"mine: {m.queries} queries, {time.perf_counter() - t0:.1f} s", flush=True)

    # The start weights: ImageNet backbone, untrained reranker (what B's pretrained() gives).
    start = work / "start.pt"
    if not start.exists():
        EfficientNetLite0VPR.pretrained().save_checkpoint(start)
    data_cfg = DataConfig(queries_store=stores["train_q"], database_store=stores["train_db"],
                          hardest_negatives=str(work / "mined"))
    # recipe rerank on the stored tokens (configs/train_gardens_point.yaml; no image specs needed)
    cfg = TrainConfig(recipe="rerank", rerank_source="tokens", name="gp_rerank", output=str(work / "runs"),
                      backbone="efficientnet-lite0", checkpoint=str(start), train=data_cfg, image_size=list(SIZE),
                      epochs=args.epochs, batch_size=TRAIN_BATCH, lr=args.lr, weight_decay=0.05, warmup_epochs=1,
                      positive_radius=args.positive_radius, negatives_top=MINE_TOP, num_workers=TRAIN_WORKERS,
                      max_steps_per_epoch=MAX_STEPS, seed=0)
    t0 = time.perf_counter()
    result = train(cfg)
    history = read_state(result.checkpoint)["history"]
    print(f"train: {result.epochs_run} epochs, {time.perf_counter() - t0:.1f} s; loss per epoch "
          f"{[round(h['loss'], 3) for h in history]}", flush=True)

    # ---- test: places TEST_PLACES (100-199), day_right database, night_right queries
    db_pos, db_desc, db_tok = load_split(stores["test_db"])
    q_pos, q_desc, q_tok = load_split(stores["test_q"])
    glob = np.argsort(((q_desc[:, None] - db_desc[None]) ** 2).sum(-1), axis=1, kind="stable")
    report = {"global": recalls(glob, q_pos, db_pos)}
    print(f"global retrieval: R@1/5/10 = {report['global']}", flush=True)
    kmax = max(int(k) for k in args.candidates.split(","))
    untrained = EfficientNetLite0VPR.load(str(start)).eval()
    trained = EfficientNetLite0VPR.load(result.model_path).eval()
    for label, model in (("untrained reranker", untrained), ("trained reranker", trained)):
        t0 = time.perf_counter()
        scores = rerank_scores(model, q_tok, db_tok, glob[:, :kmax])
        secs = time.perf_counter() - t0
        for k in (int(k) for k in args.candidates.split(",")):
            order = np.argsort(-scores[:, :k], axis=1, kind="stable")
            ranked = np.concatenate([np.take_along_axis(glob[:, :k], order, 1), glob[:, k:]], 1)
            report[f"{label} top-{k}"] = recalls(ranked, q_pos, db_pos)
            print(f"{label}, top-{k} candidates: R@1/5/10 = {report[f'{label} top-{k}']}", flush=True)
        print(f"  ({label}: {len(q_desc) * kmax} pairs in {secs:.1f} s)", flush=True)
    report["train_loss_per_epoch"] = [h["loss"] for h in history]
    report["seconds_total"] = time.perf_counter() - t_all
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
