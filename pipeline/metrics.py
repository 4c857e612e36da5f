"""Recall@N of ranked lists, in one vocabulary: fractions in [0, 1] everywhere inside the
pipeline (metrics.json, results, validation), percent only where a figure is printed.

A query counts at N when any of its first N results is right (``correct``, (Q, K) bool: result j
of query i lies within the positive radius, as ``pipeline.evaluate.correct_matrix`` or
``pipeline.spatial.geo_within`` decide). Queries without any positive in the database are
excluded, as the VG benchmark does; Recall@N for N larger than K is computed over the K results.
``recall_at`` scores one (Q, K) matrix; ``RecallCounter`` accumulates the same counts part by
part (memory O(len(ns))).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

RECALL_NS = (1, 5, 10, 20, 100)


def _check_ns(ns: Iterable[int]) -> list[int]:
    ns = list(ns)
    for n in ns:
        if n < 1:
            raise ValueError(f"recall@N needs N >= 1, got {n}")
    return ns


def recall_at(correct: np.ndarray, has_positive: np.ndarray | None = None,
              ns: Iterable[int] = RECALL_NS) -> dict[str, float | None]:
    """``{"recall@N": fraction}`` from ``correct`` (Q, K) bool and ``has_positive`` (Q,) bool (the
    database holds a positive for query i). Queries without a positive are excluded; with none
    left every recall is ``None``."""
    correct = np.asarray(correct, bool)
    if correct.ndim != 2:
        raise ValueError(f"correct must be (queries, results), got shape {correct.shape}")
    keep = np.ones(len(correct), bool) if has_positive is None else np.asarray(has_positive, bool)
    if keep.shape != (len(correct),):
        raise ValueError(f"has_positive must have one entry per query ({len(correct)}), got {keep.shape}")
    counter = RecallCounter(ns)
    counter.add(correct, keep)
    return counter.recalls()


class RecallCounter:
    """Recall@N counts accumulated part by part: O(len(ns)) state."""

    def __init__(self, ns: Sequence[int] = RECALL_NS):
        self.ns = _check_ns(ns)
        self.hits = np.zeros(len(self.ns), np.int64)
        self.counted = 0

    def add(self, correct: np.ndarray, has_positive: np.ndarray) -> None:
        c = np.asarray(correct, bool)[np.asarray(has_positive, bool)]
        self.counted += len(c)
        for i, n in enumerate(self.ns):
            self.hits[i] += int(c[:, :n].any(axis=1).sum()) if c.size else 0

    def recalls(self) -> dict[str, float | None]:
        return {f"recall@{n}": (None if self.counted == 0 else float(h / self.counted))
                for n, h in zip(self.ns, self.hits)}


def percent(fraction: float | None, digits: int = 1) -> str:
    """A recall as printed: ``0.817`` -> ``"81.7"``; ``None`` (no query counted) -> ``"-"``."""
    return "-" if fraction is None else f"{100 * fraction:.{digits}f}"
