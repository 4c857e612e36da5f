"""Local tokens for scoring: whole Zarr chunks, decoded once and kept in a bounded per-actor cache.

A store's ``local_tokens`` array is chunked by rows (``chunk_rows``, 16 by default). Reading one
scattered row costs its whole chunk, so the job orders work by candidate chunk (see
``pipeline.rerank.workers``) and every scorer actor keeps the last ``cache_chunks`` decoded chunks
(least recently used out). Memory per actor: ``cache_chunks x chunk_rows x T x 131 x 2`` bytes
(float16, as stored): 256 chunks of 16 x 64 tokens = 69 MB, independent of the queries and pairs.

``fetched_bytes`` counts whole chunks read from the store (in the stored dtype); the job
compares it with the bytes of the distinct candidates it served (rows x T x 131 x 2).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import storage


class ChunkCache:
    """Rows of one store's ``local_tokens`` through an LRU of decoded chunks."""

    def __init__(self, store: str, cache_chunks: int = 256, array=None):
        self.store = store
        self.array = array if array is not None else storage.open_local_tokens(store)
        self.chunk_rows = int(self.array.chunks[0])
        self.rows = int(self.array.shape[0])
        self.cache_chunks = max(1, int(cache_chunks))
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.fetched_bytes = 0
        self.fetched_chunks = 0

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.array.shape[1:])) * self.array.dtype.itemsize

    def _fetch(self, c: int) -> np.ndarray:
        """One whole stored chunk from the store, counted."""
        lo, hi = c * self.chunk_rows, min(self.rows, (c + 1) * self.chunk_rows)
        got = np.asarray(self.array[lo:hi])
        self.fetched_bytes += got.nbytes
        self.fetched_chunks += 1
        return got

    def _chunk(self, c: int) -> np.ndarray:
        got = self._chunks.get(c)
        if got is not None:
            self._chunks.move_to_end(c)
            return got
        got = self._fetch(c)
        self._chunks[c] = got
        if len(self._chunks) > self.cache_chunks:
            self._chunks.popitem(last=False)
        return got

    def read(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), T, 131) in the order asked."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows),) + tuple(self.array.shape[1:]), np.float32)
        chunk_of = rows // self.chunk_rows
        for c in np.unique(chunk_of):
            sel = np.nonzero(chunk_of == c)[0]
            out[sel] = self._chunk(int(c))[rows[sel] - c * self.chunk_rows]
        return out

    def read_rows_once(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the order asked, as stored (float16), each of their chunks fetched once and not
        kept in the LRU: for a partition's query tokens (O(partition queries) memory)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows),) + tuple(self.array.shape[1:]), self.array.dtype)
        chunk_of = rows // self.chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.r_[True, np.diff(chunk_of[order]) != 0, True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            sel = order[a:b]
            c = int(chunk_of[sel[0]])
            got = self._chunks.get(c)
            if got is None:
                got = self._fetch(c)
            out[sel] = got[rows[sel] - c * self.chunk_rows]
        return out
