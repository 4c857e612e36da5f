"""Stray pairs: candidates that lie outside their query's score partition, sent to the partition
whose database rows hold them.

A score partition covers the queries whose global top-1 candidate lies in one stretch of database
rows (route.py), and most of a query's candidates lie in that stretch too. The rest (a look-alike
street elsewhere in the city, a query at the edge of its stretch) are strays: scored where the
query is, each would cost a whole token chunk that no other pair of the partition shares, and
those chunks belong to another partition's stretch, which fetches them anyway. So after the
bounds are fixed, each search partition's strays are split off into a file sorted by the owning
score partition, with one copy of their query's tokens per (owner, query) (one query's tokens
are a sixteenth of a chunk; the query's other strays to that owner carry null); phase 3 scores
a partition's own pairs and the strays it owns in one chunk-ordered pass, and writes every score
under the partition its query belongs to (``origin``)::

    routes/search-SSSSS.parquet ─► pairs ─► owner = score partition of the candidate's row
        owner != origin ─► strays/search-SSSSS.parquet   sorted by (owner, candidate row), small
                                                           row groups (min/max statistics)
                           strays/progress/search-SSSSS.json   after it: counts, bytes

Memory: one search partition's route rows (its queries, K candidates, tokens) and one row group
of stray tokens at a time; the stray file is written row group by row group. The copies are
O(distinct (owner, query) of the partition's strays), not O(stray pairs).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .results import ResultsLayout
from .route import ROW_GROUP, TokenRows, candidate_pairs, owner_of, read_range, tokens_column

STRAY_SCHEMA = pa.schema([
    ("owner", pa.int32()),            # the score partition that scores the pair (its rows hold the candidate)
    ("origin", pa.int32()),           # the score partition of the query (where its results part is)
    ("query_id", pa.int64()),
    ("gi", pa.int32()),               # the candidate's position in the query's K list
    ("candidate_row", pa.int64()),
    ("query_tokens", pa.large_binary()),  # the query's tokens on its first stray to this owner, else null
])


def split_strays(results: str, s: int, bounds: dict[str, Any], catalog: dict[str, np.ndarray],
                 token_shape: tuple[int, ...], token_dtype, marker: dict[str, Any]) -> dict[str, int]:
    """Write search partition ``s``'s stray pairs (sorted by owner, then candidate row), then its
    marker. Returns the counts written."""
    from .route import read_route_rows
    lay = ResultsLayout(results)
    rt = read_route_rows(lay.routes.file(s), 0, int(bounds["bins"]))
    pairs = candidate_pairs(rt, catalog)
    origin_of_query = (np.searchsorted(np.asarray(bounds["edges"]), rt.column("route_bin").to_numpy(),
                                       side="right") - 1).astype(np.int32)
    origin = origin_of_query[pairs["qi"]]
    owner = owner_of(pairs["row"], bounds)
    stray = np.flatnonzero(owner != origin)
    order = stray[np.lexsort((pairs["gi"][stray], pairs["qi"][stray], pairs["row"][stray], owner[stray]))]
    # The query's tokens once per (owner, query): on the first of its strays to that owner.
    qi_sorted = pairs["qi"][order]
    first = np.zeros(len(order), bool)
    first[np.unique(owner[order].astype(np.int64) * max(1, rt.num_rows) + qi_sorted, return_index=True)[1]] = True
    tokens = TokenRows(rt.column("query_tokens"), token_shape, token_dtype)
    qids = rt.column("query_id").to_numpy()
    fs, path = storage.filesystem(lay.strays.file(s))
    storage.makedirs(fs, path.rsplit("/", 1)[0])
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, STRAY_SCHEMA) as w:
        for a in range(0, len(order), ROW_GROUP):
            sel, keep = order[a:a + ROW_GROUP], first[a:a + ROW_GROUP]
            qi = qi_sorted[a:a + ROW_GROUP]
            w.write_table(pa.table({
                "owner": owner[sel], "origin": origin[sel], "query_id": qids[qi], "gi": pairs["gi"][sel].astype(np.int32),
                "candidate_row": pairs["row"][sel], "query_tokens": tokens_column(tokens.gather(qi[keep]), len(sel), keep),
            }, schema=STRAY_SCHEMA))
        if not len(order):
            w.write_table(STRAY_SCHEMA.empty_table())
    row_bytes = int(np.prod(token_shape)) * np.dtype(token_dtype).itemsize
    copies = int(first.sum())
    got = {"pairs": int(len(origin)), "stray_pairs": int(len(order)), "stray_token_copies": copies,
           "stray_query_token_bytes": copies * row_bytes}
    storage.write_json(lay.strays.progress(s), {**marker, "search_partition": s, **got})
    return got


def owned_strays(results: str, searched: list[int], q: int) -> pa.Table:
    """The stray pairs score partition ``q`` owns, from every search partition, in search-partition
    order and within one by candidate row: deterministic. ``query_tokens`` is null but on one row
    per query (``stray_query_tokens``)."""
    lay = ResultsLayout(results)
    tables = [read_range(lay.strays.file(s), "owner", q, q + 1, STRAY_SCHEMA) for s in searched]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else STRAY_SCHEMA.empty_table()


def stray_query_tokens(strays: pa.Table, shape: tuple[int, ...], dtype) -> tuple[TokenRows, np.ndarray]:
    """``(tokens, index)``: the stray queries' tokens (the strays table's own buffers, one copy per
    (owner, query), not copied again) and, per stray row, the position of its query's tokens in
    them. Memory: O(distinct stray queries), held by the table."""
    tokens = TokenRows(strays.column("query_tokens"), shape, dtype)
    qids = strays.column("query_id").to_numpy()
    have, at = np.unique(qids[tokens.valid], return_index=True)  # a query's tokens are the same in every copy
    pos = np.minimum(np.searchsorted(have, qids), max(0, len(have) - 1))
    if len(qids) and (not len(have) or (have[pos] != qids).any()):
        lost = sorted(set(qids[(have[pos] != qids) if len(have) else slice(None)].tolist()))[:5]
        raise ValueError(f"stray pairs of queries {lost} carry no query tokens")
    return tokens, (at[pos] if len(have) else pos)
