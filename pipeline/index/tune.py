"""How an index version is tuned and measured: the search parameters it ships with (``nprobe``,
``k_factor``) and the recall@K against exact search recorded in its ``infos.json``.

Each fill task answers the held-back queries twice beside its shard (``search_held_back``):
exactly (brute force over the shard) and through the new index at every candidate ``nprobe``.
The driver merges the shards' lists exactly (``tune_and_measure``), picks the smallest
``nprobe`` whose recall@K on one half of the queries reaches the target, and reports recall@K
and recall@1 on the other half, so the recorded figure was not tuned on.
"""
from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from ..log import get_logger
from .choose import to_device
from .search import apply_search_params, merge_topk, recall_against_exact

log = get_logger(__name__)

NPROBE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Tuning stops at nprobe = nlist / 8: scanning more than an eighth of the data brings little over
# exact search. Where the target recall needs more (uniform high-dimensional data, or K far
# beyond the near duplicates), the reported recall says so instead of hiding a brute-force scan.
MAX_SCAN_FRACTION = 8


def nprobe_candidates(template: faiss.Index, forced: int | None) -> list[int]:
    """The ``nprobe`` values each shard is searched at: the forced one, or the candidates up to
    an eighth of the trained index's lists; none for an index without inverted lists."""
    if forced:
        return [forced]
    ivf = faiss.try_extract_index_ivf(template)
    if ivf is None:
        return []
    return [p for p in NPROBE_CANDIDATES if p <= max(1, ivf.nlist // MAX_SCAN_FRACTION)]


def fixed_search_params(factory: str, k_factor: int) -> dict[str, Any]:
    """Search parameters that are not tuned: the refinement shortlist of a refined index."""
    return {"k_factor": k_factor} if "RFlat" in factory or "Refine" in factory else {}


def is_exact(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return type(inner) in (faiss.IndexFlat, faiss.IndexFlatIP)


def search_held_back(index: faiss.Index, ids: np.ndarray, x: np.ndarray, queries: np.ndarray, k: int,
                     nprobes: list[int], params_extra: dict[str, Any], use_gpu: str) -> dict[str, Any]:
    """One shard's answers to the held-back queries: ``{"exact": (D, I), "approx": {nprobe: (D, I)}}``
    with image ids, exactly over the shard's vectors ``x`` and through ``index`` at each nprobe."""
    kk = min(k, len(ids))
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    d_exact, p_exact = exact.search(queries, kk) if len(queries) else (np.zeros((0, kk), np.float32),
                                                                        np.zeros((0, kk), np.int64))
    i_exact = np.where(p_exact >= 0, ids[np.maximum(p_exact, 0)], -1)
    del exact
    if is_exact(index):  # brute force again would only repeat the exact search
        return {"exact": (d_exact, i_exact), "approx": {None: (d_exact, i_exact)}}
    searchable = to_device(index, use_gpu)
    approx = {}
    for p in nprobes or [None]:
        params = dict(params_extra)
        if p is not None:
            params["nprobe"] = p
        apply_search_params(searchable, params)
        approx[p] = searchable.search(queries, kk) if len(queries) else (d_exact, i_exact)
    return {"exact": (d_exact, i_exact), "approx": approx}


def drop_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Each held-back query is a database vector: remove its own id so the figure measures its
    other neighbours, as for a new photo of a known place."""
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, q) in enumerate(zip(ids, query_ids)):
        kept = row[row != q][:k]
        out[r, :len(kept)] = kept
    return out


def tune_and_measure(filled: dict[int, dict[str, Any]], query_ids: np.ndarray, nprobes: list[int],
                     params_extra: dict[str, Any], k: int, target_recall: float, forced_nprobe: int | None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(search_params, recall)`` from every shard's ``search_held_back`` answers: the chosen
    parameters, and ``recall`` with ``k``, ``recall_at_k``, ``recall_at_1``, ``queries`` and
    ``tuning`` (recall@K per nprobe tried, or None when nothing was tuned)."""
    n_q = len(query_ids)
    total = sum(f["num_vectors"] for f in filled.values())
    k_fig = max(1, min(k, total - 1))
    if n_q == 0:
        params = dict(params_extra)
        if nprobes:
            params["nprobe"] = nprobes[-1] if forced_nprobe is None else forced_nprobe
        return params, {"k": k_fig, "recall_at_k": None, "recall_at_1": None, "queries": 0}
    k_search = min(k + 1, total)
    _, exact = merge_topk([f["exact"] for f in filled.values()], k_search)
    exact = drop_self(exact, query_ids, k_fig)

    def approx_ids(p):
        _, ids = merge_topk([f["approx"][p] for f in filled.values()], k_search)
        return drop_self(ids, query_ids, k_fig)

    tuning = None
    if len(nprobes) > 1:
        # tune on the first half of the queries, report on the second: the figure is not tuned on
        half = n_q // 2
        tune, report = slice(0, half), slice(half, n_q)
        chosen, tuning = _smallest_nprobe(nprobes, lambda p: recall_against_exact(
            approx_ids(p)[tune], exact[tune], k_fig), target_recall, k_fig)
    else:
        chosen = nprobes[0] if nprobes else None
        report = slice(0, n_q)
    got = approx_ids(chosen)
    params = dict(params_extra)
    if chosen is not None:
        params["nprobe"] = int(chosen)
    return params, {
        "k": k_fig,
        "recall_at_k": round(recall_against_exact(got[report], exact[report], k_fig), 5),
        "recall_at_1": round(recall_against_exact(got[report], exact[report], 1), 5),
        "queries": int(len(query_ids[report])),
        "tuning": tuning,
    }


def _smallest_nprobe(nprobes: list[int], recall_of, target: float, k: int) -> tuple[int, dict[str, float]]:
    """The first ``nprobe`` (ascending) whose recall reaches ``target``, else the largest tried,
    with the recall of each one tried."""
    tuning: dict[str, float] = {}
    for p in nprobes:
        r = recall_of(p)
        tuning[str(p)] = round(r, 5)
        if r >= target:
            return p, tuning
    log.warning("recall@%d %.3f at nprobe=%d (1/%d of the data) stays below target_recall %.3f; "
                "consider factory=Flat or a larger budget", k, r, nprobes[-1], MAX_SCAN_FRACTION, target)
    return nprobes[-1], tuning
