"""Routing: the top-K search of every query, and the score partitions cut by database row.

Scoring reads each candidate's local tokens, and a city's candidates are neighbours in the
database (rows are in extraction order, so one street is a run of rows). If a score partition
held random queries, every partition would fetch most of the city's chunks again. So the job
runs in two phases, with a barrier between them::

    phase 1, search partition s (a run of query-store shards; partitions.py):
        query parts ─► top-K from every index shard actor (merged exactly) ─► catalog rows
        query tokens, read in row order (each query chunk once) ─► copied into the route rows
        ─► route key = the global top-1 candidate's row (no candidate: after the last row)
        ─► routes/search-SSSSS.parquet   sorted by key, small row groups (min/max stats)
           routes/progress/search-SSSSS.json   after it: a sparse histogram of keys in BINS bins
    barrier (driver): sum of the histograms (O(BINS)) ─► routes/bounds.json: score partitions as
        runs of whole bins of ``partition_queries`` queries each, the rest last (fixed once written)
    phase 2, score partition p (workers.py): the route rows with bin in [bounds[p], bounds[p+1]) of
        every search part (row groups outside the range are skipped by their statistics)

Real query sets have no positions; the top-1 candidate stands in for where a query is, so a
score partition covers one stretch of database rows and the chunks of that stretch are fetched
about once per job. A partition holds at least one bin; a bin holds the queries whose top-1 falls
in ``rows / BINS`` consecutive rows (153 rows at 10^7 images), so only a hot spot denser than
``partition_queries`` queries per bin makes a partition larger than asked.

Query tokens travel in the route rows: a score partition's queries come from every part of the
query store, and reading them there would fetch a whole 16-row chunk per query.

Memory: a search worker holds one search partition's queries, their K candidates and tokens; the driver
holds one dense histogram of BINS int64 (512 KB) and the bounds (O(partitions)).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..timefmt import utc_now
from .results import ResultsLayout

BINS = 65536
ROW_GROUP = 256

ROUTE_SCHEMA = pa.schema([
    ("query_id", pa.int64()),
    ("query_path", pa.string()),
    ("query_row", pa.int64()),
    ("query_utm_east", pa.float64()),
    ("query_utm_north", pa.float64()),
    ("query_tag", pa.string()),
    ("top1_row", pa.int64()),          # -1: no candidate
    ("route_bin", pa.int32()),
    ("candidate_id", pa.list_(pa.int64())),     # K ids in global rank order (-1: none)
    ("global_score", pa.list_(pa.float32())),
    ("query_tokens", pa.large_binary()),  # the query's local tokens as stored (float16 T x 131), or null
])


def tokens_column(tokens: np.ndarray | None, n: int, valid: np.ndarray | None = None) -> pa.Array:
    """(n, T, 131) float16 tokens as one binary value per query (null when the job reads none).
    With ``valid`` (n bools), ``tokens`` holds only the valid rows' tokens and the others are null."""
    if tokens is None:
        return pa.nulls(n, pa.large_binary())
    flat = np.ascontiguousarray(tokens)
    width = flat[0].nbytes if len(flat) else 0
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    if int(valid.sum()) != len(flat):
        raise ValueError(f"{len(flat)} token rows for {int(valid.sum())} valid values")
    offsets = np.r_[0, np.cumsum(valid.astype(np.int64) * width)]
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [bitmap, pa.py_buffer(offsets),
                                                                   pa.py_buffer(flat.tobytes())],
                                            null_count=int(n - valid.sum()))


class TokenRows:
    """The non-null values of a ``tokens_column`` (any number of chunks, as read from Parquet) as
    (n, *shape) rows in the stored dtype, without copying them: one view per chunk of the
    column's own buffers (a null value is zero bytes, so a chunk's values are contiguous).
    ``gather(idx)`` copies only the rows a batch asks for. Memory: the column, nothing more."""

    def __init__(self, column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...], dtype):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        width = int(np.prod(self.shape)) * self.dtype.itemsize
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        self.views: list[np.ndarray] = []
        valid = []
        for c in chunks:
            n = len(c)
            if n == 0:
                continue
            ok = np.ones(n, bool) if c.null_count == 0 else c.is_valid().to_numpy(zero_copy_only=False)
            valid.append(ok)
            offsets = np.frombuffer(c.buffers()[1], np.int64)[c.offset:c.offset + n + 1]
            lengths = np.diff(offsets)
            if not (lengths[ok] == width).all() or (lengths[~ok] != 0).any():
                raise ValueError(f"route tokens are not {self.shape} {self.dtype.name} per query")
            if ok.any():
                data = np.frombuffer(c.buffers()[2], np.uint8)[int(offsets[0]):int(offsets[-1])]
                self.views.append(data.view(self.dtype).reshape((int(ok.sum()),) + self.shape))
        self.valid = np.concatenate(valid) if valid else np.zeros(0, bool)  # per value of the column
        self.starts = np.cumsum([0] + [len(v) for v in self.views])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, idx: np.ndarray, dtype=None) -> np.ndarray:
        """Rows ``idx`` (positions among the non-null values) as one new array."""
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx),) + self.shape, dtype or self.dtype)
        return self.gather_into(out, np.arange(len(idx)), idx)

    def gather_into(self, out: np.ndarray, at: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``out[at[i]] = row idx[i]`` (converted to ``out``'s dtype), with no array between."""
        idx, at = np.asarray(idx, np.int64), np.asarray(at, np.int64)
        if len(idx):
            which = np.searchsorted(self.starts, idx, side="right") - 1
            for c in np.unique(which):
                sel = np.flatnonzero(which == c)
                out[at[sel]] = self.views[c][idx[sel] - self.starts[c]]
        return out


def route_bin(top1_rows: np.ndarray, num_rows: int) -> np.ndarray:
    """Bin of each query's route key; queries without a candidate go to the last bin."""
    key = np.where(np.asarray(top1_rows) < 0, num_rows, top1_rows).astype(np.int64)
    return np.minimum(key * BINS // (int(num_rows) + 1), BINS - 1).astype(np.int32)


def write_route(results: str, s: int, table: pa.Table, marker: dict[str, Any]) -> None:
    """Commit search partition ``s``: its route part (sorted by bin, then key), then its marker
    with the sparse histogram of bins."""
    lay = ResultsLayout(results)
    fs, path = storage.filesystem(lay.routes.file(s))
    storage.makedirs(fs, path.rsplit("/", 1)[0])
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP)
    bins, counts = np.unique(table.column("route_bin").to_numpy(), return_counts=True)
    storage.write_json(lay.routes.progress(s), {**marker, "search_partition": s, "queries": table.num_rows,
                                               "bins": bins.tolist(), "counts": counts.tolist()})


def cut_bounds(histogram: np.ndarray, partition_queries: int) -> list[int]:
    """Bin edges ``[0, e1, ..., BINS]``: runs of whole bins of ``partition_queries`` queries each
    (each cut after the bin where the running count reaches the next multiple), the rest in the
    last run. Every partition but the last is the size asked whatever the query set's size, so an
    actor's memory per partition does not depend on it; a bin denser than a partition makes a
    larger one."""
    total = int(histogram.sum())
    size = max(1, int(partition_queries))
    parts = max(1, -(-total // size))
    cum = np.cumsum(histogram)
    edges = [0]
    for i in range(1, parts):
        e = int(np.searchsorted(cum, i * size, side="left")) + 1
        if edges[-1] < e < BINS:
            edges.append(e)
    edges.append(BINS)
    return edges


def write_bounds(results: str, markers: dict[int, dict[str, Any]], partition_queries: int) -> dict[str, Any]:
    """The barrier: the score partitions of the whole job, from the search markers' histograms.
    Written once; a rerun reads it back, so partitions (and their batches) never change."""
    hist = np.zeros(BINS, np.int64)
    for m in markers.values():
        np.add.at(hist, np.asarray(m["bins"], np.int64), np.asarray(m["counts"], np.int64))
    rows = {int(m["database_rows"]) for m in markers.values() if "database_rows" in m}
    if len(rows) > 1:
        raise ValueError(f"search partitions of {results} were routed over different database sizes {sorted(rows)}")
    bounds = {"bins": BINS, "edges": cut_bounds(hist, partition_queries), "searched": sorted(markers),
              "database_rows": rows.pop() if rows else 1,
              "queries": int(hist.sum()), "written_at": utc_now()}
    bounds["partitions"] = len(bounds["edges"]) - 1
    storage.write_json(ResultsLayout(results).bounds, bounds)
    return bounds


def read_bounds(results: str) -> dict[str, Any] | None:
    url = ResultsLayout(results).bounds
    return storage.read_json(url) if storage.exists(url) else None


def read_range(url: str, key: str, lo: int, hi: int, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Rows of one Parquet file with ``lo <= key < hi`` (``columns`` only, default all); row groups
    outside by their min/max statistics are not read. For files sorted by ``key``: routes by bin,
    strays by owner partition, scores by origin partition."""
    cols = None if columns is None else list(dict.fromkeys(list(columns) + [key]))
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        col = pf.schema_arrow.get_field_index(key)
        keep = []
        for g in range(pf.num_row_groups):
            st = pf.metadata.row_group(g).column(col).statistics
            if st is None or not st.has_min_max or (st.max >= lo and st.min < hi):
                keep.append(g)
        t = pf.read_row_groups(keep, columns=cols) if keep else None
    if t is None:
        t = schema.empty_table() if cols is None else schema.empty_table().select(cols)
    b = t.column(key).to_numpy()
    t = t.filter(pa.array((b >= lo) & (b < hi)))
    return t if columns is None or key in columns else t.drop_columns([key])


def read_route_rows(url: str, lo: int, hi: int, columns: list[str] | None = None) -> pa.Table:
    """Rows of one route part with ``lo <= route_bin < hi``."""
    return read_range(url, "route_bin", lo, hi, ROUTE_SCHEMA, columns)


def partition_routes(results: str, bounds: dict[str, Any], p: int, columns: list[str] | None = None) -> pa.Table:
    """All route rows of score partition ``p``, in (search partition, key) order: deterministic."""
    lay = ResultsLayout(results)
    lo, hi = bounds["edges"][p], bounds["edges"][p + 1]
    tables = [read_route_rows(lay.routes.file(s), lo, hi, columns) for s in bounds["searched"]]
    tables = [t for t in tables if t.num_rows]
    if tables:
        return pa.concat_tables(tables)
    return ROUTE_SCHEMA.empty_table() if columns is None else ROUTE_SCHEMA.empty_table().select(columns)


def owner_of(rows: np.ndarray, bounds: dict[str, Any]) -> np.ndarray:
    """The score partition whose stretch of database rows holds each row (its bin's partition)."""
    bins = route_bin(rows, int(bounds["database_rows"]))
    return (np.searchsorted(np.asarray(bounds["edges"]), bins, side="right") - 1).astype(np.int32)


def candidate_pairs(rt: pa.Table, catalog: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The (query, candidate) pairs of some route rows, in (row, global rank) order: ``qi`` (the
    route row), ``gi`` (the position in its K list), ``cand`` (the catalog position), ``global_rank``
    (1-based among the known candidates), ``global_score``, ``row`` (the candidate's Zarr row).
    Ids that are -1 or not in the catalog are dropped."""
    nq = rt.num_rows
    if nq == 0:
        z = np.zeros(0, np.int64)
        return dict(qi=z, gi=z, cand=z, global_rank=z.astype(np.int32), global_score=z.astype(np.float32), row=z)
    k = len(rt.column("candidate_id")[0])
    ids = rt.column("candidate_id").combine_chunks().flatten().to_numpy().reshape(nq, k)
    gscores = rt.column("global_score").combine_chunks().flatten().to_numpy().reshape(nq, k)
    pos = np.minimum(np.searchsorted(catalog["image_id"], ids), len(catalog["image_id"]) - 1)
    known = (ids >= 0) & (catalog["image_id"][pos] == ids)
    qi, gi = np.nonzero(known)  # row-major: by query, in global rank order
    cand = pos[qi, gi]
    return dict(qi=qi, gi=gi, cand=cand, global_rank=((np.cumsum(known, axis=1) - 1)[qi, gi] + 1).astype(np.int32),
                global_score=gscores[qi, gi].astype(np.float32), row=catalog["row"][cand])
