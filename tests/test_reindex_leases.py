"""Leases and the one pointer: a held lease names its pinned state and is heartbeated, GC ignores a
dead one; ``published.resolve`` reads the pointer once (version and store generation together)."""
import time

import numpy as np

from pipeline import storage
from pipeline.index import layout as L
from pipeline.index import leases, published
from pipeline.index.retention import protected_versions
from tests.helpers_store import write_tiny_store


def test_lease_heartbeats_names_its_state_and_goes_away(tmp_path):
    index_dir = str(tmp_path / "index")
    state = published.PublishedState(store=str(tmp_path / "store"), index_dir=index_dir, index_version="v0002",
                                     store_generation=1)
    with leases.hold_lease(index_dir, "rerank/run 1", state, heartbeat_s=0.05) as lease:
        first = storage.read_json(lease.url)
        assert first["state"] == state.metadata() and first["job"] == "rerank/run 1"
        time.sleep(0.3)
        assert storage.read_json(lease.url)["heartbeat"] > first["heartbeat"]
        assert [r["state"]["index_version"] for r in leases.live_leases(index_dir, grace_s=0)] == ["v0002"]
    assert leases.read_leases(index_dir) == []
    with leases.hold_lease(None, "x", state) as nothing:  # no index: nothing to protect
        assert nothing is None

    # a job that died: its file stays, but once its heartbeat is old it no longer counts
    dead = leases.Lease(index_dir, "mine-dead", state, heartbeat_s=0.01)
    dead.heartbeat()
    time.sleep(0.1)
    assert len(leases.read_leases(index_dir)) == 1
    assert leases.live_leases(index_dir, grace_s=0) == []
    assert len(leases.live_leases(index_dir, grace_s=3600)) == 1  # still inside the grace period

    # an unfinished output that will be resumed pins its state with no heartbeat, until unpinned
    leases.pin(index_dir, "rerank-plan-ab12", state)
    time.sleep(0.05)
    assert [r["job"] for r in leases.live_leases(index_dir, grace_s=0)] == ["rerank-plan-ab12"]
    leases.unpin(index_dir, "rerank-plan-ab12")
    assert leases.live_leases(index_dir, grace_s=0) == []


def test_resolve_reads_version_and_generation_from_the_pointer(tmp_path):
    store, index_dir = str(tmp_path / "store"), str(tmp_path / "store" / "index")
    write_tiny_store(store, [np.eye(4, dtype=np.float32)])
    manifest = storage.read_manifest(store)
    storage.write_json(storage.StoreLayout(store).manifest_snapshot(3), dict(manifest, generation=3))
    infos = L.IndexLayout(index_dir).infos("v0004")
    storage.write_json(infos, {"shards": []})
    L.set_current(index_dir, "v0004", store_generation=3, store=store)
    state = published.resolve(store)  # the default index folder: its pointer names a generation
    assert (state.index_version, state.store_generation, state.index_dir) == ("v0004", 3, index_dir)
    assert published.from_metadata(state.metadata()) == state
    state.check_kept()
    storage.write_json(L.IndexLayout(index_dir).infos("v0005"), {"shards": []})
    pointer = L.set_current(index_dir, "v0005", store_generation=3)
    assert pointer["history"][0]["version"] == "v0004" and "v0004" in protected_versions(index_dir, 60)
    assert protected_versions(index_dir, 0) == {"v0005"}
