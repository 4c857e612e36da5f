"""``r2f run``: the whole pipeline on a database and a query set, into one folder.

    extract database -> index -> extract queries -> retrieve + rerank -> evaluate -> report

``--reranker ransac,r2former`` (any comma list of ``RERANKERS``; the global order is always
there): one query extraction, one index, one top-K search, then each reranker over the same
candidates; metrics.json has every reranker's recalls.

``OUT`` receives::

    database_store/  query_store/   extraction stores (pipeline.storage layout)
    index/           FAISS index with infos.json (pipeline.index)
    results/         one row per (query, candidate), in parts (pipeline.rerank.results)
    errors.parquet   every bad input: path, stage, reason (empty when none)
    metrics.json     {"global": {recall@N}, "reranked": {...} (the first reranker), "rerankers": {name: {...}},
                      ["by_tag": {tag: {...}} when queries carry tags,] "num_queries",
                      "num_queries_without_positive", "settings", "stage_seconds"}
    report.html      + report_assets/
    run.json         what the stores were built with

A rerun into the same OUT resumes the extraction stores when they were built with the same
inputs and model, and replaces them otherwise; results, metrics and report are always rewritten,
so nothing is ever appended twice.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from . import storage
from .log import get_logger
from .metrics import percent
from .rerank.rerankers import reranker_list
from .weights import build_model

log = get_logger(__name__)


@dataclass
class RunConfig:
    database: str = ""
    queries: str = ""
    out: str = ""
    backbone: str = "r2former"
    checkpoint: str | None = None
    reranker: str = "auto"
    candidates: int = 100
    positive_radius: float | None = None  # None: the database's kind decides (datasets.default_radius)
    image_size: list[int] = field(default_factory=lambda: [480, 640])
    batch_pairs: int = 400
    report_samples: int = 6
    extract: dict[str, Any] = field(default_factory=dict)  # extra ExtractConfig fields
    index: dict[str, Any] = field(default_factory=dict)    # extra IndexConfig fields
    adaptive: dict[str, Any] | None = None  # adaptive candidate counts: RULE.yaml's rules (pipeline.rerank.adaptive)


@dataclass
class RunOutput:
    out: str
    metrics: dict
    report: str
    num_errors: int


def _fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What the stores depend on: change any of it and they are rebuilt, not resumed."""
    return {"database": cfg.database, "queries": cfg.queries, "backbone": cfg.backbone,
            "checkpoint": cfg.checkpoint, "image_size": list(cfg.image_size), "extract": cfg.extract}


def _prepare_out(cfg: RunConfig) -> None:
    state_url = storage.join(cfg.out, "run.json")
    want = _fingerprint(cfg)
    if storage.exists(state_url):
        have = storage.read_json(state_url).get("fingerprint")
        if have != want:
            log.info("OUT %s was built with other inputs or model (%s); replacing its stores", cfg.out, have)
            for name in ("database_store", "query_store", "index"):
                fs, path = storage.filesystem(storage.join(cfg.out, name))
                if fs.exists(path):
                    fs.rm(path, recursive=True)
        else:
            log.info("OUT %s exists with the same inputs; resuming", cfg.out)
    storage.write_json(state_url, {"fingerprint": want})


def collect_errors(*stores: str) -> pa.Table:
    tables = [storage.read_errors(s) for s in stores if storage.exists(storage.StoreLayout(s).manifest)]
    tables = [t.select(list(storage.ERROR_SCHEMA.names)).cast(storage.ERROR_SCHEMA) for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else storage.ERROR_SCHEMA.empty_table()


def check_config(cfg: RunConfig) -> RunConfig:
    """Errors naming the option; fills the dataset-dependent defaults (the positive radius)."""
    from .datasets import default_radius

    for name in ("database", "queries", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"r2f run needs --{name}")
    if len(cfg.image_size) != 2:
        raise ValueError(f"image size must be H W, got {cfg.image_size}")
    if cfg.positive_radius is None:
        cfg.positive_radius = default_radius(cfg.database)
    if cfg.positive_radius <= 0:
        raise ValueError(f"--positive-radius must be > 0, got {cfg.positive_radius}")
    if cfg.candidates < 1:
        raise ValueError(f"--candidates must be >= 1, got {cfg.candidates}")
    try:  # a config file's value is checked as the option's is
        reranker_list(cfg.reranker)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    return cfg


def run(cfg: RunConfig) -> RunOutput:
    from . import evaluate, index, report
    from .datasets import radius_unit
    from .extract import extract_into
    from .rerank import RerankConfig, resolve_rerankers
    from .rerank import run as rerank_run

    check_config(cfg)
    # Before Ray starts or a model loads: a missing or read-only output bucket is one line.
    storage.check_output(cfg.out, "--out")
    t_all = time.perf_counter()
    # Fails fast (before any extraction) on a backbone without weights, naming the options.
    model = build_model(cfg.backbone, cfg.checkpoint)
    rerankers = resolve_rerankers(cfg.reranker, cfg.backbone, cfg.checkpoint, model=model)
    # The report's explain() panel needs the learned reranker; otherwise the model is not kept.
    explain_model = model if "r2former" in rerankers else None
    del model
    _prepare_out(cfg)
    seconds: dict[str, float] = {}
    db_store = storage.join(cfg.out, "database_store")
    q_store = storage.join(cfg.out, "query_store")
    index_dir = storage.join(cfg.out, "index")

    t = time.perf_counter()
    extract_into(cfg.database, db_store, cfg.backbone, cfg.checkpoint, cfg.image_size, cfg.extract)
    seconds["extract_database"] = time.perf_counter() - t

    t = time.perf_counter()
    index.build(index.IndexConfig(store=db_store, index_dir=index_dir, **cfg.index))
    seconds["index"] = time.perf_counter() - t

    rr = rerank_run(RerankConfig(query_store=q_store, database_store=db_store, index_dir=index_dir,
                                 results=_fresh_results(cfg.out), queries=cfg.queries,
                                 backbone=cfg.backbone, checkpoint=cfg.checkpoint, image_size=list(cfg.image_size),
                                 reranker=",".join(rerankers), candidates=cfg.candidates,
                                 batch_pairs=cfg.batch_pairs, adaptive=cfg.adaptive,
                                 extract=dict(cfg.extract)))
    seconds.update(rr.stage_seconds)

    t = time.perf_counter()
    ev = evaluate.run(evaluate.EvaluateConfig(results=rr.results, database_store=db_store,
                                              positive_radius=cfg.positive_radius, pairs_study=True))
    m = ev.metrics
    study = m.pop("pairs_study", None)  # the report's recall-against-pairs points, beside metrics.json
    if study:
        storage.write_json(storage.join(cfg.out, "pairs_study.json"), study)
    seconds["evaluate"] = time.perf_counter() - t

    errors = collect_errors(db_store, q_store)
    storage.write_parquet(storage.join(cfg.out, "errors.parquet"), errors)
    if errors.num_rows:
        log.warning("%d bad inputs, listed in %s", errors.num_rows, storage.join(cfg.out, "errors.parquet"))

    settings = {
        "database": cfg.database, "queries": cfg.queries, "backbone": cfg.backbone, "checkpoint": cfg.checkpoint,
        "reranker": cfg.reranker, "reranker_used": rr.reranker,
        "rerankers_used": list(rr.rerankers),
        "rerank_seconds": {k: round(v, 3) for k, v in rr.rerank_seconds.items()},
        "candidates": cfg.candidates,
        "candidates_used": rr.candidates, "positive_radius": cfg.positive_radius,
        "positive_radius_unit": radius_unit(cfg.database),
        "image_size": list(cfg.image_size), "num_database_images": _num_images(db_store), "num_pairs": rr.num_pairs,
        "num_errors": int(errors.num_rows), "pairs_per_second": round(rr.pairs_per_second, 2),
        "adaptive": cfg.adaptive,
    }
    metrics = {"global": m["global"], "reranked": m["reranked"], "rerankers": m["rerankers"],
               **({"by_tag": m["by_tag"]} if m.get("by_tag") else {}),
               "num_queries": m["num_queries"], "num_queries_without_positive": m["num_queries_without_positive"],
               "settings": settings, "stage_seconds": {k: round(v, 3) for k, v in seconds.items()}}
    metrics_url = storage.join(cfg.out, "metrics.json")
    write_metrics(metrics_url, metrics)

    t = time.perf_counter()
    report_url = report.write_report(cfg.out, metrics, rr.results, cfg.positive_radius,
                                     storage.extraction_size(storage.read_manifest(db_store)),
                                     query_store=q_store, database_store=db_store, samples=cfg.report_samples,
                                     title=f"R²Former run: {cfg.queries} against {cfg.database}",
                                     model=explain_model, pairs_study=study)
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    metrics["stage_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    write_metrics(metrics_url, metrics)
    log.info("run finished in %.1f s: global R@1 %s, %s -> %s", seconds["total"], _pct(m["global"].get("recall@1")),
             ", ".join(f"{name} R@1 {_pct(r.get('recall@1'))}" for name, r in m["rerankers"].items()), cfg.out)
    return RunOutput(out=cfg.out, metrics=metrics, report=report_url, num_errors=int(errors.num_rows))


def _fresh_results(out: str) -> str:
    """``OUT/results``, emptied first: results are always rewritten (the stores resume, not the
    results), and a legacy ``results.parquet`` of an older run is removed so nothing reads it."""
    for name in ("results", "results.parquet"):
        fs, path = storage.filesystem(storage.join(out, name))
        if fs.exists(path):
            fs.rm(path, recursive=True)
    return storage.join(out, "results")


def _num_images(store: str) -> int:
    m = storage.read_manifest(store)
    return int((m.get("counts") or {}).get("extracted", m.get("rows", 0)))


def write_metrics(url: str, metrics: dict) -> None:
    """metrics.json in the documented key order (recall@1, @5, ... as written, not sorted)."""
    storage.write_bytes(url, json.dumps(metrics, indent=2).encode())


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{percent(v)}%"


def register_cli(subparsers) -> None:
    from .config import add_config_arguments, add_image_size_argument

    p = subparsers.add_parser("run", help="extraction, index, reranking, evaluation and report in one go")
    add_config_arguments(p)
    p.add_argument("--database", help="database dataset (folder, URL, sequence:FOLDER or manifest)")
    p.add_argument("--queries", help="query dataset (same forms)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--backbone", choices=("r2former", "efficientnet-lite0"))
    p.add_argument("--checkpoint", help="R2Former weights (official release or `r2f train` layout)")
    p.add_argument("--reranker", type=reranker_list, metavar="NAME[,NAME...]",
                   help="rerankers over the same candidates, comma-separated: auto, r2former, ransac, none "
                        "(default auto); the first is 'reranked'")
    p.add_argument("--candidates", type=int, help="top-K global candidates reranked per query (default 100)")
    p.add_argument("--positive-radius", type=float, help="in the units of the positions: frames for a sequence: dataset "
                        "(default 2), metres otherwise (default 25)")
    p.add_argument("--adaptive", metavar="RULE.yaml", help="adaptive candidate counts: one stop rule per reranker, "
                   "as `r2f evaluate --sweep-adaptive --write-rule` writes it; without it every query reranks K")
    add_image_size_argument(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from .config import config_from_args

    cfg = config_from_args(RunConfig, args, ("database", "queries", "out", "backbone", "checkpoint", "reranker",
                                             "candidates", "positive_radius", "image_size"))
    if args.adaptive:
        from .rerank.stage import read_rule
        cfg.adaptive = read_rule(args.adaptive)
    res = run(cfg)
    m = res.metrics
    print(f"{m['num_queries']} queries ({m['num_queries_without_positive']} without a positive)")
    for kind, recalls in (("global", m["global"]), *m["rerankers"].items()):
        print(f"{kind:>9}: " + "  ".join(f"{k.replace('recall', 'R')}={_pct(v)}" for k, v in recalls.items()
                                         if k.startswith("recall@")))
    print(f"report: {res.report}")
    return 0
