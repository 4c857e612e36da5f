"""The hardest-negatives file a mining run writes, and its readers.

    <output>/hardest_negatives.parquet   query_image_id int64, hardest_negatives list<int64> (nearest
                                         first), negative_distances list<float32> (squared L2 of the
                                         unit descriptors = 2 - 2 cos, ascending)

Readers stream it in batches (``iter_hardest_negatives``) or hold it as arrays
(``read_hardest_negatives``): memory O(queries x top) int64, no Python object per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .. import storage

HARDEST_NEGATIVES_FILE = "hardest_negatives.parquet"


def hardest_negatives_schema() -> pa.Schema:
    return pa.schema([
        ("query_image_id", pa.int64()),
        ("hardest_negatives", pa.list_(pa.int64())),
        ("negative_distances", pa.list_(pa.float32())),
    ])


def _negatives_url(url: str) -> str:
    return url if url.endswith(".parquet") else storage.join(url, HARDEST_NEGATIVES_FILE)


def iter_hardest_negatives(url: str, top: int | None = None, batch_rows: int = 65536):
    """Stream a mining output as ``(query_ids (B,), negatives (B, top) int64 padded with -1)``
    batches, nearest first. Memory O(batch_rows x top); no Python object per row."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(_negatives_url(url))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        width = top
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["query_image_id", "hardest_negatives"]):
            qids = batch.column(0).to_numpy().astype(np.int64)
            lists = batch.column(1)
            offsets = lists.offsets.to_numpy().astype(np.int64)
            values = lists.values.to_numpy().astype(np.int64)
            offsets = offsets - offsets[0]
            counts = np.diff(offsets)
            w = width if width is not None else int(counts.max(initial=0))
            out = np.full((len(qids), w), -1, np.int64)
            col = np.arange(w)[None, :]
            take = col < np.minimum(counts, w)[:, None]
            src = offsets[:-1, None] + col
            out[take] = values[src[take]]
            yield qids, out


@dataclass
class HardestNegatives:
    """A mining output as arrays: ``query_ids`` (Q,) sorted, ``negatives`` (Q, top) padded with -1.
    Memory O(Q x top) int64 (the training worker's pools); ``[query_id]`` gives one row."""

    query_ids: np.ndarray
    negatives: np.ndarray

    def rows_of(self, query_ids: np.ndarray) -> np.ndarray:
        """Row of each query id, -1 where the output has none (vectorised)."""
        query_ids = np.asarray(query_ids, np.int64)
        at = np.clip(np.searchsorted(self.query_ids, query_ids), 0, max(0, len(self.query_ids) - 1))
        found = (len(self.query_ids) > 0) & (self.query_ids[at] == query_ids) if len(self.query_ids) else \
            np.zeros(len(query_ids), bool)
        return np.where(found, at, -1)

    def __len__(self) -> int:
        return len(self.query_ids)

    def __contains__(self, query_id: int) -> bool:
        return int(self.rows_of(np.array([query_id]))[0]) >= 0

    def __getitem__(self, query_id: int) -> np.ndarray:
        r = int(self.rows_of(np.array([query_id]))[0])
        if r < 0:
            raise KeyError(query_id)
        row = self.negatives[r]
        return row[row >= 0]

    def get(self, query_id: int, default=None):
        return self[query_id] if query_id in self else default


def read_hardest_negatives(url: str, top: int | None = None) -> HardestNegatives:
    """A mining output (the folder or the Parquet file itself) as ``HardestNegatives``, read in
    streamed batches; ``top`` keeps the nearest ``top`` negatives per query."""
    ids, negs = [], []
    for q, n in iter_hardest_negatives(url, top):
        ids.append(q)
        negs.append(n)
    if not ids:
        return HardestNegatives(np.zeros(0, np.int64), np.zeros((0, top or 0), np.int64))
    width = max(n.shape[1] for n in negs)
    negs = [np.pad(n, ((0, 0), (0, width - n.shape[1])), constant_values=-1) for n in negs]
    q, n = np.concatenate(ids), np.concatenate(negs)
    order = np.argsort(q, kind="stable")
    return HardestNegatives(q[order], n[order])
