"""Adaptive candidate counts: rerank a query's first few candidates, and more only when its
scores are not yet convincing. One stop rule per reranker; the job (phases.py, workers.py) and
the offline fit (``r2f evaluate --sweep-adaptive``) run the same cascade, ``prefix_lengths``.

A rule (``RerankConfig.adaptive[<reranker>]``, or one entry of RULE.yaml)::

    rounds: [5, 20]                      # prefix lengths scored in turn; the run's K is always last
    stop: {score: 40.0, margin: 8.0}     # stop when best >= score and best - second best >= margin
    gate: {global_margin: 0.02}          # optional: a query whose global top-1 leads its top-2 by less
                                         # starts at the second round

The cascade of one query for one reranker::

    L = rounds[0] (rounds[1] when the gate says so)
    score candidates [0, L) in global order
    while L < K and not stop(scores of [0, L)): L = next round; score [.., L)

``stop`` looks at every score the query has so far (best and second best; one score alone has an
unbounded margin). Candidates past L are not scored: their score is null, and they rank after
the scored ones, in global order (``rerankers.reranked_order``).

In the job, the rounds of every reranker of the run are merged (``job_bounds``): round i scores
positions ``[b[i-1], b[i])`` of the queries whose prefix for some reranker reaches past ``b[i-1]``,
decided from the scores of the rounds before (``prefix_lengths(..., known=b[i-1])``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RULE_KEYS = {"rounds", "stop", "gate"}


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class AdaptiveRule:
    """One reranker's stop rule and rounds. ``score`` / ``margin``: thresholds on the best score and
    on its lead over the second best (either or both); ``gate_margin``: the global-score lead under
    which a query starts at the second round (None: no gate)."""

    rounds: tuple[int, ...]
    score: float | None = None
    margin: float | None = None
    gate_margin: float | None = None

    def __post_init__(self):
        if not self.rounds or any(int(r) < 1 for r in self.rounds) or list(self.rounds) != sorted(set(self.rounds)):
            raise RuleError(f"rounds must be increasing candidate counts >= 1, got {list(self.rounds)}")
        if self.score is None and self.margin is None:
            raise RuleError("a stop rule needs stop.score, stop.margin or both")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], name: str = "") -> AdaptiveRule:
        where = f"adaptive rule of {name!r}" if name else "adaptive rule"
        if not isinstance(data, Mapping):
            raise RuleError(f"{where} must be a mapping with rounds and stop, got {data!r}")
        unknown = sorted(set(data) - RULE_KEYS)
        if unknown or "rounds" not in data or "stop" not in data:
            raise RuleError(f"{where} has keys {sorted(data)}; it needs rounds and stop (gate optional), "
                            f"unknown: {unknown}")
        stop, gate = dict(data["stop"] or {}), dict(data.get("gate") or {})
        if set(stop) - {"score", "margin"} or set(gate) - {"global_margin"}:
            raise RuleError(f"{where}: stop takes score and margin, gate takes global_margin; got stop {stop}, "
                            f"gate {gate}")
        f = lambda v: None if v is None else float(v)  # noqa: E731
        try:
            return cls(rounds=tuple(int(r) for r in data["rounds"]), score=f(stop.get("score")),
                       margin=f(stop.get("margin")), gate_margin=f(gate.get("global_margin")))
        except RuleError as exc:
            raise RuleError(f"{where}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        stop = {k: v for k, v in (("score", self.score), ("margin", self.margin)) if v is not None}
        out: dict[str, Any] = {"rounds": list(self.rounds), "stop": stop}
        if self.gate_margin is not None:
            out["gate"] = {"global_margin": self.gate_margin}
        return out

    def rounds_for(self, k: int) -> list[int]:
        """The rounds at a run's K: those below K, then K."""
        return [int(r) for r in self.rounds if r < k] + [int(k)]

    def describe(self) -> str:
        parts = ["rounds " + "/".join(str(r) for r in self.rounds)]
        if self.score is not None:
            parts.append(f"score>={self.score:g}")
        if self.margin is not None:
            parts.append(f"margin>={self.margin:g}")
        if self.gate_margin is not None:
            parts.append(f"gate<{self.gate_margin:g}")
        return " ".join(parts)


def rules_of(adaptive: Mapping[str, Any] | None, rerankers: Sequence[str]) -> dict[str, AdaptiveRule] | None:
    """The rules of a run (``RerankConfig.adaptive``: one rule per reranker name), None when the
    run is not adaptive. A reranker of the run without a rule is an error naming it; ``none``
    (the global order: nothing is scored) cannot be adaptive. Rules of rerankers the run does not
    list are left out."""
    if not adaptive:
        return None
    if not isinstance(adaptive, Mapping):
        raise RuleError(f"adaptive must map reranker names to rules, got {adaptive!r}")
    if "rounds" in adaptive or "stop" in adaptive:
        raise RuleError("adaptive holds one rule per reranker name (adaptive: {ransac: {rounds: [...], stop: "
                        "{...}}}), not a bare rule")
    if "none" in rerankers:
        raise RuleError("reranker none (the global order) cannot be adaptive: it scores nothing")
    missing = [n for n in rerankers if n not in adaptive]
    if missing:
        raise RuleError(f"the adaptive rule has no entry for reranker(s) {missing} of this run "
                        f"(it has {sorted(adaptive)}); give each reranker of the run a rule")
    return {n: AdaptiveRule.from_json(adaptive[n], n) for n in rerankers}


def rules_json(rules: Mapping[str, AdaptiveRule] | None) -> dict[str, Any] | None:
    return None if rules is None else {n: r.to_json() for n, r in rules.items()}


def job_bounds(rules: Mapping[str, AdaptiveRule] | None, k: int) -> list[int]:
    """The job's round boundaries: every rule's rounds below K, merged, then K. ``[K]`` for a fixed run."""
    cuts = {int(k)}
    for r in (rules or {}).values():
        cuts.update(r.rounds_for(k))
    return sorted(cuts)


def best_two(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best and second best of each row, ignoring NaN (unscored); -inf where there is none."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    if s.shape[1] == 0:
        z = np.full(len(s), -np.inf)
        return z, z
    if s.shape[1] == 1:
        return s[:, 0], np.full(len(s), -np.inf)
    part = -np.partition(-s, 1, axis=1)[:, :2]
    return part[:, 0], part[:, 1]


def stops(rule: AdaptiveRule, scores: np.ndarray) -> np.ndarray:
    """(Q,) bool: the rule is met by each query's scores so far (Q, L) (NaN: not scored)."""
    best, second = best_two(np.asarray(scores, np.float64))
    ok = np.isfinite(best)
    if rule.score is not None:
        ok &= best >= rule.score
    if rule.margin is not None:
        with np.errstate(invalid="ignore"):
            ok &= (best - second) >= rule.margin
    return ok


def first_rounds(rule: AdaptiveRule, global_scores: np.ndarray, k: int) -> np.ndarray:
    """(Q,) the first prefix length of each query: the first round, or the second where the gate
    finds the global top-1's lead over the top-2 below ``gate_margin``."""
    rounds = rule.rounds_for(k)
    start = np.full(len(global_scores), rounds[0], np.int64)
    if rule.gate_margin is not None and len(rounds) > 1:
        best, second = best_two(np.asarray(global_scores, np.float64)[:, :min(2, k)])
        with np.errstate(invalid="ignore"):
            start[~((best - second) >= rule.gate_margin)] = rounds[1]
    return start


def prefix_lengths(rule: AdaptiveRule, scores: np.ndarray, global_scores: np.ndarray, k: int,
                   known: int | None = None) -> np.ndarray:
    """(Q,) how many leading candidates (global order) each query scores under ``rule``, given its
    scores (Q, >= known) of the positions before ``known`` (default K: every score the cascade
    could ask for). A query whose prefix reaches past ``known`` keeps that prefix (its round is
    still to be scored); the rest are decided: stopped, or at K. The job asks with ``known`` = the
    boundary of the rounds scored so far, the offline fit with all K scores: the same cascade."""
    known = int(k if known is None else known)
    rounds = rule.rounds_for(k)
    length = first_rounds(rule, global_scores, k)
    scores = np.asarray(scores, np.float64)
    for j, r in enumerate(rounds[:-1]):
        if r > known:
            break
        at = np.flatnonzero(length == r)
        if len(at):
            go = at[~stops(rule, scores[at, :r])]
            length[go] = rounds[j + 1]
    return length


def scored_mask(lengths: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(Q, K) bool: positions scored under prefix ``lengths`` among the known candidates ``valid``."""
    k = valid.shape[1]
    return (np.arange(k)[None, :] < np.asarray(lengths)[:, None]) & valid
