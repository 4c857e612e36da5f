"""Garbage collection over five reindexes of one store (deletions and moves; a hand-written store, so
no model runs): the store stays within 1.5x a fresh extraction of the kept states, every kept state is
searchable and can be rolled back to, a leased state outlives keep_versions, and a reader of a
collected state fails naming the file instead of reading Zarr fill values."""
import numpy as np
import pytest

from pipeline import cli, reindex, storage
from pipeline.index import leases, list_versions, published, search
from tests.helpers_reindex import tree_bytes, write_hand_store, write_source

FRAMES = list(range(12))
CHANGES = [(2, 5), (3, 0), (9, 1), (8, 10), (11, 6)]  # (deleted frame, moved frame) per reindex


def _ids(state: published.PublishedState) -> set[int]:
    return set(state.read_global_table(["image_id"]).column("image_id").to_pylist())


def test_five_reindexes_with_gc_stay_small_and_keep_every_kept_state(ray_session, gardens_point, tmp_path):
    folder = gardens_point / "day_left"
    src = tmp_path / "src.csv"
    write_source(src, folder, FRAMES)
    store = str(tmp_path / "store")
    write_hand_store(store, str(src), tokens=64, dim=64)
    cfg = reindex.ReindexConfig(source=str(src), store=store, keep_versions=2, gc_grace_s=0.0,
                                gc_compact_below=0.75, index=dict(held_back_queries=2, num_shards=2))
    index_dir = cfg.resolved_index_dir
    assert reindex.run(cfg).version == "v0001"
    first = published.resolve(store, index_dir)
    first_rows = first.read_global_table(["image_id", "row"])
    first_tokens = first.read_local_tokens(first_rows.column("row").to_numpy())

    frames, east = list(FRAMES), {}
    leased = None
    reports = []
    for step, (gone, moved) in enumerate(CHANGES):
        frames.remove(gone)
        east[moved] = 100.0 + step
        write_source(src, folder, frames, east)
        if step == 1:  # a long job pins the state published after the first reindex
            leased = published.resolve(store, index_dir)
            lease_cm = leases.hold_lease(index_dir, "evaluate-long", leased, heartbeat_s=2.0)
            lease_cm.__enter__()
        result = reindex.run(cfg)
        assert result.status == "published" and result.gc is not None
        reports.append(result.gc)
        if step == 3:
            lease_cm.__exit__(None, None, None)
        kept = [h["version"] for h in reindex.list_history(cfg)]
        if 1 <= step <= 3:
            assert leased.index_version in kept  # beyond keep_versions=2, held by the lease
            assert _ids(leased) == _ids(published.open_state(store, index_dir, leased.index_version,
                                                               leased.store_generation))
    assert sum(r["bytes_reclaimed"] for r in reports) > 0
    print("gc reports", [(r["bytes_reclaimed"], r["chunks_deleted"], r["chunks_compacted"]) for r in reports])
    assert sum(r["chunks_deleted"] for r in reports) > 0 and sum(r["chunks_compacted"] for r in reports) > 0
    assert leased.index_version not in list_versions(index_dir)  # collected once the lease went away

    # every kept state is searchable and can be rolled back to
    history = reindex.list_history(cfg)
    assert len(history) == 2 and history[-1]["current"]
    for h in history:
        state = published.open_state(store, index_dir, h["version"], h["store_generation"])
        table = state.read_global_table(["image_id", "global_descriptor", "row"])
        q = storage.descriptors_of(table)
        got = search(index_dir, q, k=1, version=h["version"]).ids[:, 0]
        assert np.array_equal(got, table.column("image_id").to_numpy())
        tokens = state.read_local_tokens(table.column("row").to_numpy())
        # untouched by compaction: every kept row still has the tokens it was written with
        first_pos = {i: k for k, i in enumerate(first_rows.column("image_id").to_pylist())}
        assert np.array_equal(tokens, first_tokens[[first_pos[i] for i in table.column("image_id").to_pylist()]])
    for h in history:
        assert reindex.rollback(cfg, h["version"]).status == "rolled_back"
        state = published.resolve(store, index_dir)
        assert (state.index_version, state.store_generation) == (h["version"], h["store_generation"])

    # bytes: at most 1.5x a fresh extraction of the kept states (their images, written once)
    union = sorted({f for f in FRAMES if f not in [g for g, _ in CHANGES[:-1]]})
    fresh = str(tmp_path / "fresh")
    write_source(tmp_path / "fresh.csv", folder, union, east)
    write_hand_store(fresh, str(tmp_path / "fresh.csv"), tokens=64, dim=64)
    used, fresh_bytes = tree_bytes(store, exclude=[index_dir]), tree_bytes(fresh)
    print(f"store {used} bytes, fresh extraction of the kept states {fresh_bytes} bytes, "
          f"ratio {used / fresh_bytes:.2f}")
    assert used <= 1.5 * fresh_bytes

    # a reader of a collected state (no lease) fails naming the file, never reading fill values
    with pytest.raises(storage.StoreError, match=r"manifests/g0000\.json"):
        first.read_local_tokens(first_rows.column("row").to_numpy())
    with pytest.raises(storage.StoreError, match=r"missing Parquet file .*part-0000"):
        first.read_global_table(["image_id"])
    with pytest.raises(storage.StoreError, match="g0000"):
        published.from_metadata(first.metadata())

    # the CLI: a dry run reports and deletes nothing; nothing is left to collect
    before = tree_bytes(store)
    assert cli.main(["reindex", "--store", store, "--gc", "--dry-run"]) == 0
    assert tree_bytes(store) == before
    assert reindex.collect(cfg).gc["bytes_reclaimed"] == 0

    # `r2f search` resolves the published state once and records it with its results
    np.save(tmp_path / "q.npy", storage.descriptors_of(published.resolve(store, index_dir)
                                                       .read_global_table(["global_descriptor"])))
    out = str(tmp_path / "hits.parquet")
    assert cli.main(["search", "--index-dir", index_dir, "--queries", str(tmp_path / "q.npy"), "--out", out,
                     "--k", "2"]) == 0
    now = published.resolve(store, index_dir)
    assert storage.parquet_metadata(out)["state"]["store_generation"] == now.store_generation
    assert storage.parquet_metadata(out)["index_version"] == now.index_version
    assert leases.read_leases(index_dir) == []
