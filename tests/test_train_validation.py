"""Rerank-stage validation (``pipeline.train.rerank_recall_at``) on a synthetic city from
``bench/city.py``: it reads tokens one query batch at a time (never a store's tokens at once) and
gives the recall of a direct, brute-force computation of the same reranking."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from pipeline import storage, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.city import write_city  # noqa: E402

T, K, BATCH, RADIUS = 16, 10, 4, 25.0


def token_match_logits(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A reranker stand-in with a known answer: the mean best cosine of each query token."""
    qf = torch.nn.functional.normalize(q[..., 3:], dim=-1)
    cf = torch.nn.functional.normalize(c[..., 3:], dim=-1)
    s = torch.bmm(qf, cf.transpose(1, 2)).amax(2).mean(1)
    return torch.stack([-s, s], dim=1)


def test_rerank_validation_streams_tokens_and_matches_direct(tmp_path, monkeypatch):
    db, q = tmp_path / "db", tmp_path / "q"
    write_city(str(db), 640, tokens=T, part_rows=160)
    write_city(str(q), 40, tokens=T, part_rows=160, queries_of=640)

    reads: list[tuple[str, int]] = []
    real_read = storage.read_local_tokens

    def spy(store, rows, array=None):
        reads.append((str(store), len(rows)))
        return real_read(store, rows, array)

    monkeypatch.setattr(storage, "read_local_tokens", spy)
    got = train.rerank_recall_at(token_match_logits, str(q), str(db), RADIUS, K, query_batch=BATCH)
    monkeypatch.setattr(storage, "read_local_tokens", real_read)

    # Streamed: one query batch of tokens per read, never a whole store.
    assert reads and max(n for _, n in reads) <= BATCH * K
    assert sum(n for s, n in reads if s == str(q)) == 40

    # Direct: brute-force global top K, every pair scored, candidates reordered, positions checked.
    cols = ["row", "utm_east", "utm_north", "global_descriptor"]
    qt, dbt = storage.read_global_table(str(q), cols), storage.read_global_table(str(db), cols)
    qd, dd = storage.descriptors_of(qt), storage.descriptors_of(dbt)
    top = np.argsort(((qd[:, None] - dd[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :K]
    q_tok = real_read(str(q), qt.column("row").to_numpy())
    db_tok = real_read(str(db), dbt.column("row").to_numpy())
    pos = lambda t: np.stack([t.column("utm_east").to_numpy(), t.column("utm_north").to_numpy()], 1)
    q_pos, db_pos = pos(qt), pos(dbt)
    first_hit = []
    for i in range(len(qd)):
        logits = token_match_logits(torch.from_numpy(q_tok[[i] * K]), torch.from_numpy(db_tok[top[i]]))
        order = top[i][np.argsort(-logits.softmax(1)[:, 1].numpy(), kind="stable")]
        hit = np.linalg.norm(db_pos[order] - q_pos[i], axis=1) <= RADIUS
        first_hit.append(int(hit.argmax()) if hit.any() else K)
    first_hit = np.array(first_hit)
    want = {f"recall@{n}": 100.0 * float((first_hit < n).mean()) for n in train.RECALL_KS if n <= K}
    assert got.keys() == want.keys()
    for key in want:
        assert abs(got[key] - want[key]) < 1e-9, (got, want)
        assert 0.0 <= got[key] <= 100.0
