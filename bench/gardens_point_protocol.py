"""Gardens Point, one protocol for every method: global retrieval, RANSAC and the learned reranker.

Splits (places = frame indices, the ``utm_east`` of a ``sequence:`` dataset; every image is
extracted once, into the one store of its traverse and split)::

    day_left [0, 80)  ──► train_q  ─┐
    day_right[0, 80)  ──► train_db ─┴► pipeline.mine (soft positives 2 frames, top 100)
                                       ──► pipeline.train stage rerank (stored tokens, 2 Ray Train workers)
    day_right  [80, 200) ──► eval_db ─┐  validation: places 80-99  (choose settings here)
    night_right[80, 200) ──► eval_q  ─┴► test:       places 100-199 (reported once per change)

Validation and test use the same protocol: database day_right, queries night_right of the split's
places only, tolerance 2 frames. Per split: global top-20 by the stored global descriptors
(exact FAISS), then each reranker (``pipeline.rerank.score.PairScorer``: ``ransac`` =
``pipeline.ransac`` inlier counts, ``r2former`` = the trained EfficientNet-Lite0 reranker) scores
the same candidates; K = 10 reorders the first 10 of them (pair scores do not depend on the other
candidates). Recalls by ``pipeline.evaluate`` (``correct_matrix``, ``has_positive``) and ``pipeline.metrics.recall_at``.

Model: EfficientNet-Lite0 (ImageNet weights, frozen) at 272x480, 500 stride-16 tokens per image.
Training: day_left queries, day_right database, positives within ``--positive-radius`` frames
(best by global descriptor, as bench/train_gardens_point.py), negatives drawn from the
``--negatives-top`` hardest mined ones.

    .venv/bin/python bench/gardens_point_protocol.py [--work /tmp/r2f_gp_protocol] [--epochs 8]

Stores, mined negatives and training runs are cached under ``--work``, keyed by their settings,
so a rerun with other training flags extracts and mines nothing again.

    .venv/bin/python bench/gardens_point_protocol.py --smoke

``--smoke`` runs every step at the smallest size, in a temporary ``--work``: places 0-11 for
training and evaluation alike (val 0-5, test 6-11; the day_right store then serves both, extracted
once), 128x224 images, K = 2, 4, one training step on one Ray Train worker. Ray: the cluster named
by ``RAY_ADDRESS`` when set, else a local one.

``--official-recipe`` trains the learned reranker with the official rerank recipe instead of the
stored-token settings above: ``pipeline.train`` recipe ``rerank`` on the images path
(``rerank_source: images``: the frozen backbone in eval mode recomputes every training image's
tokens, ``local_head`` and the reranker learn), its loss, AdamW lr 5e-4 / weight decay 0.03, per-epoch
5-warmup-epoch cosine schedule and frozen parts left at the recipe's values; only the protocol's
``--epochs`` and batch (16 queries, 2 workers) are set here, and the run prints ``deviations``.
Since ``local_head`` changes, the evaluation stores are extracted again with the trained model
for this reranker (the global descriptors, hence the candidates, do not change: the backbone and
global head are frozen); RANSAC keeps the original stores. Its row is labelled
"learned reranker (official rerank recipe, images)"; ``--lr``/``--augment`` do not apply to it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
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
from pipeline.evaluate import correct_matrix, has_positive  # noqa: E402
from pipeline.extract import ExtractConfig, extract_dataset  # noqa: E402
from pipeline.metrics import recall_at  # noqa: E402
from pipeline.mine import MineConfig  # noqa: E402
from pipeline.mine import run as mine
from pipeline.model import EfficientNetLite0VPR  # noqa: E402
from pipeline.ransac import RansacConfig  # noqa: E402
from pipeline.rerank.score import PairScorer  # noqa: E402
from pipeline.train import DataConfig, TrainConfig, deviations, nearest_rows, read_state  # noqa: E402
from pipeline.train import run as train

BACKBONE = "efficientnet-lite0"
SIZE = (272, 480)
TOL = 2.0            # frames: a retrieved image within 2 places of the query is right
MINE_RADIUS = 2.0    # frames: soft positives left out of the mined negatives
KS = (10, 20)        # candidates reranked
NS = (1, 5, 10)
MINE_TOP = 100       # hardest negatives mined per training query
TRAIN_BATCH, TRAIN_WORKERS, MAX_STEPS = 16, 2, 0
# name, traverse, first place, end place (exclusive)
SPLITS = [("train_q", "day_left", 0, 80), ("train_db", "day_right", 0, 80),
          ("eval_db", "day_right", 80, 200), ("eval_q", "night_right", 80, 200)]
EVAL = {"val": (80, 100), "test": (100, 200)}
LR = 3e-4            # stored-token mode (the official recipe keeps its own)
OFFICIAL_LABEL = "learned reranker (official rerank recipe, images)"


def smoke_settings(args) -> None:
    """The smallest setting that still runs every step (see the module docstring)."""
    global SIZE, KS, MINE_TOP, SPLITS, EVAL, TRAIN_BATCH, TRAIN_WORKERS, MAX_STEPS
    SIZE, KS, MINE_TOP = (128, 224), (2, 4), 4
    SPLITS = [("train_q", "day_left", 0, 12), ("train_db", "day_right", 0, 12),
              ("eval_db", "day_right", 0, 12), ("eval_q", "night_right", 0, 12)]
    EVAL = {"val": (0, 6), "test": (6, 12)}
    TRAIN_BATCH, TRAIN_WORKERS, MAX_STEPS = 2, 1, 1
    args.epochs, args.negatives_top = 1, MINE_TOP


def key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def subset(folder: Path, lo: int, hi: int):
    t = load_dataset(f"sequence:{folder}")
    east = t.column("utm_east")
    return t.filter(pc.and_(pc.greater_equal(east, lo), pc.less(east, hi)))


def file_digest(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def extract_stores(work: Path, data: Path, checkpoint: str | None = None,
                   names: tuple[str, ...] | None = None) -> dict[str, str]:
    """One store per (traverse, places) under a folder named by its settings; a finished store is
    reused as it is (the extraction skips shards already written). ``checkpoint``: a trained
    model.pt to extract with (keyed by its content) instead of the ImageNet start."""
    cfg = ExtractConfig(backbone=BACKBONE, image_size=SIZE, batch_size=16, shard_size=64, chunk_rows=16,
                        progress=False, num_actors=1, threads_per_actor=2, checkpoint=checkpoint)
    weights = [cfg.checkpoint] if checkpoint is None else [file_digest(checkpoint)]
    stores, made = {}, {}
    for name, folder, lo, hi in SPLITS:
        if names is not None and name not in names:
            continue
        if (folder, lo, hi) in made:  # the same images (--smoke): one store serves both splits
            stores[name] = stores[made[folder, lo, hi]]
            continue
        made[folder, lo, hi] = name
        path = work / "stores" / f"{name}-{key([folder, lo, hi, BACKBONE, SIZE, *weights])}"
        stores[name] = str(path)
        done = path.parent / f"{path.name}.done"
        if done.exists():
            continue
        t0 = time.perf_counter()
        res = extract_dataset(subset(data / folder, lo, hi), str(path), cfg, source=f"{folder}[{lo}:{hi}]")
        if res.num_failed:
            raise RuntimeError(f"extraction of {name} failed for {res.num_failed} images")
        done.write_text(json.dumps({"images": res.num_images}))
        print(f"extract {name} ({folder} places {lo}-{hi - 1}{', trained model' if checkpoint else ''}): "
              f"{res.num_extracted} images, {time.perf_counter() - t0:.1f} s", flush=True)
    return stores


def mined(work: Path, stores: dict[str, str]) -> str:
    out = work / "mined" / key([stores["train_q"], stores["train_db"], MINE_RADIUS, MINE_TOP])
    if not (out / "hardest_negatives.parquet").exists():
        t0 = time.perf_counter()
        m = mine(MineConfig(queries=stores["train_q"], database=stores["train_db"], output=str(out),
                            soft_positive_radius=MINE_RADIUS, top_k=MINE_TOP))
        print(f"mine: {m.queries} queries, {time.perf_counter() - t0:.1f} s", flush=True)
    return str(out)


def start_checkpoint(work: Path, seed: int) -> str:
    """ImageNet backbone and a reranker at its seeded random initialisation."""
    path = work / f"start-seed{seed}.pt"
    if not path.exists():
        torch.manual_seed(seed)
        EfficientNetLite0VPR.pretrained().save_checkpoint(path)
    return str(path)


def official_config(work: Path, data: Path, stores: dict[str, str], negatives: str, start: str, args,
                    ) -> tuple[str, TrainConfig]:
    """The official rerank recipe on the images path; only epochs and batch are the protocol's."""
    folder = {name: f for name, f, _, _ in SPLITS}
    data_cfg = DataConfig(queries=f"sequence:{data / folder['train_q']}", database=f"sequence:{data / folder['train_db']}",
                          queries_store=stores["train_q"], database_store=stores["train_db"],
                          hardest_negatives=negatives)
    settings = dict(official_recipe=True, epochs=args.epochs, batch=TRAIN_BATCH, workers=TRAIN_WORKERS,
                    max_steps=MAX_STEPS, positive_radius=args.positive_radius, negatives_top=args.negatives_top,
                    seed=args.seed)
    name = f"gp_rerank_official-{key([settings, stores['train_q'], stores['train_db']])}"
    cfg = TrainConfig(recipe="rerank", rerank_source="images", name=name, output=str(work / "runs"),
                      backbone=BACKBONE, checkpoint=start, train=data_cfg, image_size=list(SIZE), epochs=args.epochs,
                      batch_size=TRAIN_BATCH, positive_radius=args.positive_radius, negatives_top=args.negatives_top,
                      num_workers=TRAIN_WORKERS, max_steps_per_epoch=MAX_STEPS, seed=args.seed)
    return name, cfg


def train_reranker(work: Path, stores: dict[str, str], negatives: str, args) -> tuple[str, dict]:
    """The learned reranker for these flags: (model.pt, summary). A finished run is reused."""
    start = start_checkpoint(work, args.seed)
    if args.official_recipe:
        name, cfg = official_config(work, Path(args.data), stores, negatives, start, args)
        print(f"train: official rerank recipe on images; protocol epochs {args.epochs}, batch {TRAIN_BATCH} queries "
              f"(global, {TRAIN_WORKERS} Ray Train workers), max steps per epoch {MAX_STEPS or 'no cap'}; "
              f"deviations from the official recipe: {deviations(cfg) or 'none'}", flush=True)
        settings = {"official_recipe": True, "epochs": args.epochs, "batch": TRAIN_BATCH,
                    "deviations": deviations(cfg)}
    else:
        data_cfg = DataConfig(queries_store=stores["train_q"], database_store=stores["train_db"],
                              hardest_negatives=negatives)
        settings = dict(epochs=args.epochs, lr=args.lr, positive_radius=args.positive_radius,
                        negatives_top=args.negatives_top, seed=args.seed, augment=args.augment)
        if args.augment != "none":
            settings["augment_scale"] = args.augment_scale
        name = f"gp_rerank-{key([settings, stores['train_q'], stores['train_db']])}"
        extra = {"augment": args.augment, "augment_scale": args.augment_scale} if args.augment != "none" else {}
        # recipe rerank on the stored tokens (the stores above hold them; no image specs needed)
        cfg = TrainConfig(recipe="rerank", rerank_source="tokens", name=name, output=str(work / "runs"),
                          backbone=BACKBONE, checkpoint=start, train=data_cfg, image_size=list(SIZE),
                          epochs=args.epochs, batch_size=TRAIN_BATCH, lr=args.lr, weight_decay=0.05, warmup_epochs=1,
                          positive_radius=args.positive_radius, negatives_top=args.negatives_top,
                          num_workers=TRAIN_WORKERS, max_steps_per_epoch=MAX_STEPS, seed=args.seed, **extra)
    summary_path = work / "runs" / name / "protocol-summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        print(f"train: reusing {name} ({summary['epochs']} epochs, {summary['seconds']:.1f} s when trained)",
              flush=True)
        return summary["model_path"], summary
    load0, t0 = load_avg(), time.perf_counter()
    result = train(cfg)
    secs = time.perf_counter() - t0
    history = read_state(result.checkpoint)["history"]
    steps = sum(len(h.get("step_losses", ())) for h in history) or None
    in_epochs = sum(h.get("epoch_seconds", 0.0) for h in history)   # the steps, without Ray/worker start-up
    summary = {"model_path": result.model_path, "epochs": result.epochs_run, "seconds": secs, "steps": steps,
               "epoch_seconds": round(in_epochs, 2),
               "load_before": load0, "load_after": load_avg(), "settings": settings,
               "loss_per_epoch": [round(h["loss"], 4) for h in history]}
    summary_path.write_text(json.dumps(summary, indent=2))
    print(f"train {name}: {result.epochs_run} epochs, {secs:.1f} s (load average {load0} -> {summary['load_after']}); "
          f"loss per epoch {summary['loss_per_epoch']}", flush=True)
    return result.model_path, summary


def read_split(store: str, lo: int, hi: int):
    """(image ids, zarr rows, positions (N, 2), unit global descriptors) of a store's images at places [lo, hi)."""
    t = storage.read_global_table(store, ["image_id", "row", "utm_east", "global_descriptor"])
    east = t.column("utm_east").to_numpy().astype(np.float64)
    keep = np.flatnonzero((east >= lo) & (east < hi))
    ids = t.column("image_id").to_numpy().astype(np.int64)[keep]
    rows = t.column("row").to_numpy().astype(np.int64)[keep]
    xy = np.stack([east[keep], np.zeros(len(keep))], 1)  # a sequence: position = frame index
    return ids, rows, xy, storage.descriptors_of(t)[keep]


def rows_of(store: str, ids: np.ndarray) -> np.ndarray:
    """Zarr rows of ``ids`` in another store of the same images (its row order may differ)."""
    t = storage.read_global_table(store, ["image_id", "row"])
    where = dict(zip(t.column("image_id").to_pylist(), t.column("row").to_pylist()))
    return np.array([where[int(i)] for i in ids], np.int64)


def score_candidates(scorer: PairScorer, q_rows: np.ndarray, db_rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(Q, K) scores of every (query, candidate) pair, one query's K pairs per batch."""
    out = np.zeros(cand.shape, np.float32)
    for i in range(len(cand)):
        q, c = scorer.read(np.full(cand.shape[1], q_rows[i]), db_rows[cand[i]])
        out[i] = scorer.score(q, c)
    return out


def recalls(q_xy, db_xy, ranked: np.ndarray) -> dict[int, float]:
    correct = correct_matrix(q_xy, db_xy[ranked], TOL)
    r = recall_at(correct, has_positive(q_xy, db_xy, TOL), NS)
    return {n: 100.0 * r[f"recall@{n}"] for n in NS}


def evaluate_split(split: str, stores: dict[str, str], scorers: dict[str, PairScorer]) -> list[dict]:
    lo, hi = EVAL[split]
    db_ids, db_rows, db_xy, db_desc = read_split(stores["eval_db"], lo, hi)
    q_ids, q_rows, q_xy, q_desc = read_split(stores["eval_q"], lo, hi)
    kmax = max(KS)
    glob = nearest_rows(q_desc, db_desc, len(db_desc))  # full global ranking (indices into the split)
    rows = [{"method": "global retrieval", "K": "-", **recalls(q_xy, db_xy, glob), "seconds": None,
             "load": load_avg()}]
    for label, scorer in scorers.items():
        # a scorer on stores extracted again (trained local_head) reads the same images by id
        own_q = q_rows if scorer.query_store == stores["eval_q"] else rows_of(scorer.query_store, q_ids)
        own_db = db_rows if scorer.database_store == stores["eval_db"] else rows_of(scorer.database_store, db_ids)
        load0, t0 = load_avg(), time.perf_counter()
        scores = score_candidates(scorer, own_q, own_db, glob[:, :kmax])
        secs = time.perf_counter() - t0
        for k in KS:
            order = np.argsort(-scores[:, :k], axis=1, kind="stable")  # ties keep the global order
            ranked = np.concatenate([np.take_along_axis(glob[:, :k], order, 1), glob[:, k:]], 1)
            rows.append({"method": label, "K": k, **recalls(q_xy, db_xy, ranked),
                         "seconds": secs * k / kmax, "load": f"{load0} -> {load_avg()}"})
    return rows, len(q_rows)


def format_table(split: str, rows: list[dict], queries: int) -> str:
    lo, hi = EVAL[split]
    lines = [f"{split}: places {lo}-{hi - 1}, database day_right, {queries} night_right queries, tolerance {TOL:g} frames",
             "| method | K | R@1 | R@5 | R@10 | rerank wall s | load average (1/5/15 min) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['method']} | {r['K']} | {r[1]:.1f} | {r[5]:.1f} | {r[10]:.1f} | {secs} | {r['load']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gardens_point"))
    ap.add_argument("--work", default="/tmp/r2f_gp_protocol")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help=f"stored-token mode only (default {LR})")
    ap.add_argument("--positive-radius", type=float, default=1.0, help="frames (training positives)")
    ap.add_argument("--negatives-top", type=int, default=100,
                    help="training negatives drawn from this many hardest mined ones")
    ap.add_argument("--augment", default="none", choices=["none", "homography"],
                    help="augmentation of the training pairs' candidate tokens (pipeline.augment)")
    ap.add_argument("--augment-scale", type=float, default=0.08,
                    help="homography corner offsets, fraction of the longer image side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", default="val,test", help="which evaluation splits to print")
    ap.add_argument("--no-ransac", action="store_true", help="skip RANSAC (the same for every training flag)")
    ap.add_argument("--official-recipe", action="store_true",
                    help="train with the official rerank recipe on the images path (only --epochs and the "
                         "protocol's batch set here); see the module docstring")
    ap.add_argument("--smoke", action="store_true",
                    help="every step at the smallest size, in a temporary --work (tests/test_bench_scripts.py)")
    args = ap.parse_args()
    if args.official_recipe and (args.lr is not None or args.augment != "none"):
        ap.error("--official-recipe keeps the recipe's learning rate and has no augmentation (images path)")
    if not args.official_recipe and args.lr is None:
        args.lr = LR
    return gp_common.run_maybe_smoke(args, protocol, smoke_settings, "gp_protocol_smoke_")


def protocol(args) -> int:
    work, data = gp_common.start(args)
    t_all = time.perf_counter()
    print(f"command: {' '.join(sys.argv)}", flush=True)
    print(f"load average at start: {load_avg()}", flush=True)

    stores = extract_stores(work, data)
    negatives = mined(work, stores)
    model_path, summary = train_reranker(work, stores, negatives, args)

    scorers = {}
    if not args.no_ransac:
        scorers["RANSAC"] = PairScorer("ransac", BACKBONE, None, stores["eval_q"], stores["eval_db"],
                                       RansacConfig(image_scale=float(max(SIZE))), threads=2)
    if args.official_recipe:
        # local_head learnt: the evaluation tokens are those of the trained model
        own = extract_stores(work, data, checkpoint=model_path, names=("eval_db", "eval_q"))
        scorers[OFFICIAL_LABEL] = PairScorer("r2former", BACKBONE, model_path, own["eval_q"], own["eval_db"],
                                             RansacConfig(), threads=2)
    else:
        scorers["learned reranker"] = PairScorer("r2former", BACKBONE, model_path, stores["eval_q"],
                                                 stores["eval_db"], RansacConfig(), threads=2)
    report = {"command": sys.argv, "train": summary}
    for split in args.splits.split(","):
        rows, queries = evaluate_split(split, stores, scorers)
        print(format_table(split, rows, queries), flush=True)
        report[split] = rows
    per_step = f" ({summary['epoch_seconds']:.1f} s in the epochs' {summary['steps']} steps, " \
               f"{summary['epoch_seconds'] / summary['steps']:.2f} s per step)" if summary.get("steps") else ""
    print(f"training: {summary['epochs']} epochs in {summary['seconds']:.1f} s{per_step} (load average "
          f"{summary['load_before']} -> {summary['load_after']}); total wall {time.perf_counter() - t_all:.1f} s",
          flush=True)
    out = work / f"report-{key(vars(args))}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
