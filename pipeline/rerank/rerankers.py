"""The rerankers by name: which names exist, how a command line's list is read, how ``auto``
resolves against the loaded weights, and the one rule that turns rerank scores into an order.

Names: ``r2former`` (the learned transformer; score = softmax(logits)[:, 1]), ``ransac``
(pipeline.ransac: mutual nearest neighbours + a robust homography, score = inlier count),
``none`` (the global order), ``auto`` (r2former when the weights include a trained reranker,
otherwise ransac); ``token-similarity`` is a benchmark stand-in, accepted but not listed.

The order rule: candidates by rerank score, higher first, ties in global order; candidates an
adaptive run did not score (NaN score) after the scored ones, in global order. The job's commit
phase (``reranked_ranks``, vectorised over a partition) and anything that reorders one query
(``reranked_order``) use the same sort key, so they cannot disagree.
"""
from __future__ import annotations

import argparse

import numpy as np

from ..log import get_logger

log = get_logger(__name__)

RERANKERS = ("auto", "r2former", "ransac", "none")
# A stand-in scorer for benchmarks: it reads the real tokens (the cost the job is about) but
# costs almost no compute. Not a reranker anyone should evaluate.
BENCH_SCORERS = ("token-similarity",)


def reranker_list(text: str) -> str:
    """A ``--reranker`` value: a comma list of ``RERANKERS`` names, returned joined without
    spaces; an unknown or empty item is an error naming the choices (an argparse ``type``)."""
    items = [x.strip() for x in str(text).split(",")]
    bad = [x for x in items if x not in RERANKERS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"unknown reranker(s) {bad or [text]} in {text!r}; "
                                         f"give a comma list of {', '.join(RERANKERS)}")
    return ",".join(items)


def resolve_reranker(name: str, backbone: str, checkpoint: str | None, model=None) -> str:
    """``auto`` -> ``r2former`` when the loaded weights include a trained reranker, else ``ransac``."""
    if name not in RERANKERS and name not in BENCH_SCORERS:
        raise ValueError(f"unknown reranker {name!r}; choose one of {RERANKERS}")
    if name != "auto":
        return name
    if model is None:
        from ..weights import build_model
        model = build_model(backbone, checkpoint)
    trained = bool(getattr(model, "has_trained_reranker", False))
    chosen = "r2former" if trained else "ransac"
    log.info("reranker auto -> %s (%s)", chosen,
             "weights include a trained reranker" if trained else "no trained reranker in these weights")
    return chosen


def resolve_rerankers(spec: str | list[str], backbone: str, checkpoint: str | None, model=None,
                      allow_untrained: bool = False) -> list[str]:
    """A comma list of rerankers (``"ransac,r2former"``) -> names in order; ``none`` is always
    implied (the global order is every result's ``global_rank``) and is kept only when alone.
    ``auto`` resolves as ``resolve_reranker``. A listed ``r2former`` whose weights have no trained
    reranker is an error naming the checkpoint: its scores would be noise."""
    items = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x.strip()]
    if not items:
        raise ValueError("no reranker given")
    names: list[str] = []
    for item in items:
        name = resolve_reranker(item, backbone, checkpoint, model=model)
        if name not in names:
            names.append(name)
    if len(names) > 1:
        names = [n for n in names if n != "none"]
    if "r2former" in names and "auto" not in items and not allow_untrained:
        if model is None:
            from ..weights import build_model
            model = build_model(backbone, checkpoint)
        if not getattr(model, "has_trained_reranker", False):
            raise ValueError(f"--reranker lists r2former, but the weights of {backbone} from "
                             f"{checkpoint or '(no --checkpoint: pretrained backbone only)'} include no trained "
                             f"reranker; train one (r2f train --stage rerank) or drop r2former from the list")
    return names


def _order_keys(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unscored, -score): scored candidates first, by score; unscored ones compare equal."""
    s = np.asarray(scores, np.float64)
    unscored = np.isnan(s)
    return unscored, np.where(unscored, 0.0, -s)


def reranked_order(rerank_score: np.ndarray, global_rank: np.ndarray) -> np.ndarray:
    """Indices that sort one query's candidates by rerank score, ties broken by global rank;
    unscored candidates (NaN) last, in global order."""
    unscored, key = _order_keys(rerank_score)
    return np.lexsort((global_rank, key, unscored))


def reranked_ranks(qi: np.ndarray, scores: np.ndarray, global_rank: np.ndarray) -> np.ndarray:
    """1-based rank of each pair within its query (``qi``): ``reranked_order`` for every query
    at once, by (query, -score, global rank)."""
    n = len(qi)
    unscored, key = _order_keys(scores)
    order = np.lexsort((global_rank, key, unscored, qi))
    rank = np.empty(n, np.int32)
    if n:
        starts = np.r_[0, np.flatnonzero(np.diff(qi[order])) + 1]
        counts = np.diff(np.r_[starts, n])
        rank[order] = np.arange(n) - np.repeat(starts, counts) + 1
    return rank
