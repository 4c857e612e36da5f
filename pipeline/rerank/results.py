"""The committed results of a rerank job, and the one reader every later stage uses.

A results location is a folder (the streaming job) or, for runs made before it, one Parquet file::

    <results>/plan.json                 written first: what this folder is the result of (checked on resume)
    <results>/part-00012.parquet        one row per (query, candidate) of partition 12 (RESULTS_SCHEMA)
    <results>/progress/part-00012.json  partition 12 committed (written after its part): counts, token bytes
    <results>/attempts/part-00012.json  tries of partition 12 by the current run (a crash counts as one)
    <results>/failures/part-00012.json  partition 12 failed every attempt: its query ids and the reason
    <results>/routes/search-00003.parquet          phase 1: search partition 3's queries and top-K (route.py)
    <results>/routes/progress/search-00003.json    committed, with its histogram of route bins
    <results>/routes/bounds.json        the barrier: which bins each score partition covers (fixed once written)
    <results>/strays/search-00003.parquet          phase 2: search partition 3's pairs scored by another partition
    <results>/scores/score-00012.parquet           phase 3: scores of the pairs whose candidate is in partition 12's rows
    <results>/rounds/round-1/prefix-00012.parquet  adaptive runs, before round 1: how many leading candidates
                                                   each query of partition 12 scores, per reranker (adaptive.py)
    <results>/rounds/round-1/score-00012.parquet   round 1's scores (round 0's are scores/), as phase 3's
    <results>/manifest.json             written last: the parts of a finished job and the state it read

A part carries ``rank`` / ``rerank_score`` of the first reranker of the run and, for every
reranker ``n`` of the run (the first included), ``rank_<n>`` / ``rerank_score_<n>``: one top-K
search, several rerankers over the same candidates. Results written before that have only
``rank`` / ``rerank_score`` (``rerankers_of`` and ``rank_column`` read both).

An adaptive run (``RerankConfig.adaptive``) scores a prefix of each query's candidates: the
others have a null ``rerank_score_<n>`` and rank after the scored ones, in global order; the
pairs a query had scored by reranker ``n`` are its rows with a non-null ``rerank_score_<n>``.

A part holds whole queries, rows ordered by (query, reranked rank). ``iter_parts`` yields one
part at a time, so readers hold one partition's rows, never the whole result set.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from .. import storage

RESULTS_LAYOUT_VERSION = 3  # 3: per-reranker rank_<n> / rerank_score_<n> columns, query_tag

RESULTS_SCHEMA = pa.schema([
    ("query_id", pa.int64()),
    ("query_path", pa.string()),
    ("rank", pa.int32()),            # 1-based, after reranking
    ("global_rank", pa.int32()),     # 1-based, global retrieval order
    ("image_id", pa.int64()),        # the candidate
    ("candidate_path", pa.string()),
    ("global_score", pa.float32()),  # as the index returns it (similarity: higher is better)
    ("rerank_score", pa.float32()),  # r2former: match probability; ransac: inliers; none: global_score
    ("query_utm_east", pa.float64()),
    ("query_utm_north", pa.float64()),
    ("candidate_utm_east", pa.float64()),
    ("candidate_utm_north", pa.float64()),
])


SCORES_ROW_GROUP = 4096  # rows per row group of a score file (read by origin partition)


def scores_schema(scorers: list[str]) -> pa.Schema:
    return pa.schema([("origin", pa.int32()), ("query_id", pa.int64()), ("gi", pa.int32())]
                     + [(f"score_{n}", pa.float32()) for n in scorers])


def results_schema(rerankers: list[str]) -> pa.Schema:
    """RESULTS_SCHEMA, the query's tag, and one rank / score column pair per reranker."""
    fields = list(RESULTS_SCHEMA) + [pa.field("query_tag", pa.string())]
    for n in rerankers:
        fields += [pa.field(f"rank_{n}", pa.int32()), pa.field(f"rerank_score_{n}", pa.float32())]
    return pa.schema(fields)


def rank_column(name: str, rerankers: list[str], columns: list[str] | None = None) -> str:
    """The column holding reranker ``name``'s ranks: ``rank_<name>``, or ``rank`` for results of
    one reranker written before per-reranker columns."""
    col = f"rank_{name}"
    if columns is None or col in columns:
        return col
    if rerankers and name == rerankers[0]:
        return "rank"
    raise KeyError(f"no ranks of reranker {name!r} in these results (columns {columns})")


def score_column(name: str, rerankers: list[str], columns: list[str] | None = None) -> str:
    return rank_column(name, rerankers, columns).replace("rank", "rerank_score", 1)


class PartitionFiles:
    """One phase's files of partition ``n`` under ``<base>/``: ``<prefix>NNNNN.parquet`` (its
    data), then ``progress/<prefix>NNNNN.json`` (committed: written after the data),
    ``attempts/`` (tries by the current run, written before each, so a try that takes its worker
    down still counts) and ``failures/`` (every attempt failed: its query ids and the reason)."""

    def __init__(self, base: str, prefix: str):
        self.base, self.prefix = base, prefix

    def _name(self, n: int, ext: str) -> str:
        return f"{self.prefix}{int(n):05d}.{ext}"

    def file(self, n: int) -> str:
        return storage.join(self.base, self._name(n, "parquet"))

    def progress(self, n: int) -> str:
        return storage.join(self.base, "progress", self._name(n, "json"))

    def attempts(self, n: int) -> str:
        return storage.join(self.base, "attempts", self._name(n, "json"))

    def failure(self, n: int) -> str:
        return storage.join(self.base, "failures", self._name(n, "json"))

    def committed(self) -> dict[int, dict[str, Any]]:
        """``{n: marker}`` of the committed partitions. O(partitions)."""
        return markers_in(self.progress(0), self.prefix)


class ResultsLayout:
    """Where everything of one results folder lives: the parts and, per phase, ``PartitionFiles``
    (``parts``: results parts; ``routes``: phase 1, search partitions; ``strays``: phase 2, search
    partition s's stray pairs by the score partition that owns them; ``scores``: phase 3, the
    scores of every pair whose candidate lies in score partition q's rows)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.parts = PartitionFiles(self.root, "part-")
        self.routes = PartitionFiles(storage.join(self.root, "routes"), "search-")
        self.strays = PartitionFiles(storage.join(self.root, "strays"), "search-")
        self.scores = PartitionFiles(storage.join(self.root, "scores"), "score-")

    def round_scores(self, i: int) -> PartitionFiles:
        """Round ``i``'s scores: ``scores/`` for round 0 (every fixed-K run), ``rounds/round-i/``
        after it."""
        return self.scores if i == 0 else PartitionFiles(self._round(i), "score-")

    def prefixes(self, i: int) -> PartitionFiles:
        """Before round ``i`` >= 1: each query's prefix length per reranker, by score partition."""
        return PartitionFiles(self._round(i), "prefix-")

    def _round(self, i: int) -> str:
        return storage.join(self.root, "rounds", f"round-{int(i)}")

    def phase_files(self, phase: str, round_: int = 0) -> PartitionFiles:
        """The files of a phase (``routes``, ``strays``, ``scores``, ``prefixes``, ``parts``) in round ``round_``."""
        if phase == "scores":
            return self.round_scores(round_)
        if phase == "prefixes":
            return self.prefixes(round_)
        return getattr(self, phase)

    @property
    def plan(self) -> str:
        return storage.join(self.root, "plan.json")

    @property
    def manifest(self) -> str:
        return storage.join(self.root, "manifest.json")

    @property
    def bounds(self) -> str:
        """The barrier after phase 1: which route bins each score partition covers."""
        return storage.join(self.root, "routes", "bounds.json")

    def part(self, partition: int) -> str:
        return self.parts.file(partition)

    def progress(self, partition: int) -> str:
        return self.parts.progress(partition)


def markers_in(url_of_zero: str, prefix: str) -> dict[int, dict[str, Any]]:
    """``{n: marker}`` of the markers beside ``url_of_zero`` (the URL marker 0 would have) whose
    names are ``<prefix>NNNNN.json``. O(partitions)."""
    folder = url_of_zero.rsplit("/", 1)[0]
    fs, path = storage.filesystem(folder)
    if not fs.exists(path):
        return {}
    numbers = sorted(int(f.rsplit(prefix, 1)[1].split(".")[0]) for f in fs.glob(f"{path}/{prefix}*.json"))
    return {n: storage.read_json(storage.join(folder, f"{prefix}{n:05d}.json")) for n in numbers}


def is_single_file(results: str) -> bool:
    """A legacy results file (one Parquet for the whole run) rather than a folder of parts."""
    fs, path = storage.filesystem(results)
    return fs.isfile(path)


def committed_partitions(results: str) -> dict[int, dict[str, Any]]:
    """Progress markers of the committed partitions: ``{partition: marker}``. O(partitions)."""
    return ResultsLayout(results).parts.committed()


def write_part(results: str, partition: int, table: pa.Table, marker: dict[str, Any]) -> None:
    """Commit one partition: its Parquet part, then its progress marker (a part without a marker
    is a partition that did not finish; the next run rewrites it)."""
    lay = ResultsLayout(results)
    storage.write_parquet(lay.part(partition), table, {"results_layout_version": RESULTS_LAYOUT_VERSION,
                                                       "partition": partition})
    storage.write_json(lay.progress(partition), {**marker, "partition": partition, "rows": table.num_rows})


def part_urls(results: str) -> list[str]:
    """The Parquet files of a result set: the parts its manifest lists (or, for a folder without a
    manifest, the committed ones), or the single legacy file."""
    if is_single_file(results):
        return [results]
    lay = ResultsLayout(results)
    if storage.exists(lay.manifest):
        return [lay.part(p) for p in storage.read_json(lay.manifest)["parts"]]
    if not storage.exists(storage.join(results, "progress")):
        raise storage.StoreError(f"{results} holds no results (no manifest.json, no committed parts)")
    return [lay.part(p) for p in sorted(committed_partitions(results))]


def iter_parts(results: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """One table per part (whole queries each). Memory: one part at a time."""
    for url in part_urls(results):
        yield storage.read_parquet(url, columns)


def results_metadata(results: str) -> dict[str, Any]:
    """What produced the results: the manifest of a folder, the Parquet metadata of a legacy file."""
    if is_single_file(results):
        return storage.parquet_metadata(results)
    lay = ResultsLayout(results)
    for url in (lay.manifest, lay.plan):
        if storage.exists(url):
            return storage.read_json(url)
    return {}


def rerankers_of(results: str) -> list[str]:
    """The rerankers of a result set, first one first (its ranks are also in ``rank``)."""
    meta = results_metadata(results)
    names = meta.get("rerankers") or (meta.get("plan") or {}).get("rerankers")
    if names:
        return list(names)
    return [meta["reranker"]] if meta.get("reranker") else []


def read_results(results: str, max_rows: int | None = None) -> pa.Table:
    """The rows of a result set as one table: for small runs and tests (``max_rows`` stops after
    the part that reaches it; whole queries only)."""
    tables, n = [], 0
    for t in iter_parts(results):
        tables.append(t)
        n += t.num_rows
        if max_rows is not None and n >= max_rows:
            break
    return pa.concat_tables(tables) if tables else RESULTS_SCHEMA.empty_table()
