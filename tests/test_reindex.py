"""Incremental reindexing on real Gardens Point images (efficientnet-lite0, local Ray): add, change and
delete images, check the new version holds exactly the expected ids while searches keep answering
from the old one until CURRENT flips; a second run is a no-op; an interrupted run leaves CURRENT
alone and the next run finishes it; rollback restores the older version and its store generation."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import cli, reindex, storage
from pipeline.datasets import DATASET_SCHEMA
from pipeline.index import current_version, list_versions, search
from pipeline.index.layout import IndexLayout

SIZE = [128, 224]


def _ids(*names):
    return sorted(storage.image_id_for(n) for n in names)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def setup(gardens_point, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(6):
        shutil.copy(gardens_point / "day_left" / f"Image{i:03d}.jpg", src / f"Image{i:03d}.jpg")
    cfg = reindex.ReindexConfig(
        source=str(src), store=str(tmp_path / "store"), keep_versions=3,
        extract=dict(backbone="efficientnet-lite0", image_size=SIZE, batch_size=4, shard_size=4, chunk_rows=2,
                     progress=False),
        index=dict(held_back_queries=2, num_shards=2))  # one index shard per extraction shard
    return src, cfg


def test_add_change_delete_interrupt_noop_rollback(ray_session, gardens_point, setup):
    src, cfg = setup
    index_dir = cfg.resolved_index_dir
    lay = IndexLayout(index_dir)

    first = reindex.run(cfg)
    assert first.status == "published" and first.version == "v0001" and first.previous_version is None
    v1_ids = _ids(*[f"Image{i:03d}.jpg" for i in range(6)])
    assert reindex.version_image_ids(index_dir, "v0001").tolist() == v1_ids
    v1_files = _tree_digest(Path(lay.version_dir("v0001")))
    old_tokens = storage.read_local_tokens(cfg.store, storage.read_global_table(cfg.store, ["row"])
                                           .column("row").to_numpy())
    old_table = storage.read_global_table(cfg.store)

    # add two, change one (new bytes under the same name), delete one
    for i in (6, 7):
        shutil.copy(gardens_point / "day_left" / f"Image{i:03d}.jpg", src / f"Image{i:03d}.jpg")
    shutil.copy(gardens_point / "night_right" / "Image001.jpg", src / "Image001.jpg")
    (src / "Image002.jpg").unlink()

    ids_v1, queries = storage.read_global_descriptors(cfg.store)
    before = search(index_dir, queries, k=4)
    seen, plans = [], []

    def during(stage, info):
        # every step before the CURRENT write: searches answer from v0001, unchanged
        assert current_version(index_dir) == "v0001"
        got = search(index_dir, queries, k=4)
        assert np.array_equal(got.ids, before.ids) and np.allclose(got.scores, before.scores)
        assert set(got.ids.ravel().tolist()) <= set(v1_ids)
        seen.append(stage)
        if stage == "planned":
            plans.append(info["plan"])
        if stage == "index_built":  # the run dies after building its version, before publishing it
            raise KeyboardInterrupt("simulated crash before publishing")

    with pytest.raises(KeyboardInterrupt):
        reindex.run(cfg, on_stage=during)
    assert seen == ["planned", "extracted", "adopted", "snapshot", "index_built"]
    plan = plans[0]
    assert (len(plan.added_ids), len(plan.changed_ids), len(plan.deleted_ids), len(plan.moved)) == (2, 1, 1, 0)
    assert plan.unchanged == 4
    assert current_version(index_dir) == "v0001"  # the interrupted run left the published version alone
    assert reindex.version_image_ids(index_dir).tolist() == v1_ids
    assert _tree_digest(Path(lay.version_dir("v0001"))) == v1_files

    # the next run finishes the job: the new store generation is there, only the index is built
    second = reindex.run(cfg)
    assert second.status == "published" and second.previous_version == "v0001" and second.version == "v0003"
    assert "finishing an interrupted run" in second.message
    assert (second.added, second.changed, second.deleted) == (2, 1, 1)
    expected = _ids("Image000.jpg", "Image001.jpg", "Image003.jpg", "Image004.jpg", "Image005.jpg",
                    "Image006.jpg", "Image007.jpg")
    assert reindex.version_image_ids(index_dir, "v0003").tolist() == expected
    assert current_version(index_dir) == "v0003"
    assert _tree_digest(Path(lay.version_dir("v0001"))) == v1_files  # the old version was never touched
    # extraction shard 0 lost rows (retired; its survivors rewritten as a new shard), shard 1 did not:
    # its index shard is copied, and the new extraction shards form one new index shard
    record = storage.read_json(storage.join(index_dir, "reindex", "v0003.json"))
    assert record["store_generation"] == 1
    assert second.reused_index_shards == [1] and second.rebuilt_index_shards == [2]

    new_table = storage.read_global_table(cfg.store)
    assert sorted(new_table.column("image_id").to_pylist()) == expected
    by_id = {r["image_id"]: r for r in new_table.to_pylist()}
    old_by_id = {r["image_id"]: r for r in old_table.to_pylist()}
    changed = storage.image_id_for("Image001.jpg")
    assert by_id[changed]["content_hash"] != old_by_id[changed]["content_hash"]
    assert not np.allclose(by_id[changed]["global_descriptor"], old_by_id[changed]["global_descriptor"])
    kept = storage.image_id_for("Image003.jpg")  # in a rewritten shard: same descriptor, same tokens
    assert by_id[kept]["shard"] != old_by_id[kept]["shard"] and by_id[kept]["row"] == old_by_id[kept]["row"]
    assert np.allclose(by_id[kept]["global_descriptor"], old_by_id[kept]["global_descriptor"])
    old_rows = {r["image_id"]: k for k, r in enumerate(old_table.select(["image_id"]).to_pylist())}
    assert np.array_equal(storage.read_local_tokens(cfg.store, np.array([by_id[kept]["row"]]))[0],
                          old_tokens[old_rows[kept]])
    # a new image's tokens were copied into the store's own Zarr rows, and searching for it finds it
    added = storage.image_id_for("Image007.jpg")
    assert np.abs(storage.read_local_tokens(cfg.store, np.array([by_id[added]["row"]]))).sum() > 0
    q = np.array([by_id[added]["global_descriptor"]], np.float32)
    assert search(index_dir, q, k=1).ids[0, 0] == added

    # nothing new: nothing happens, and it says so
    third = reindex.run(cfg)
    assert third.status == "noop" and "nothing to do" in third.message
    assert third.version == "v0003" and list_versions(index_dir, finished_only=False) == ["v0001", "v0002", "v0003"]

    # rollback through the CLI: CURRENT and the store manifest go back to v0001's
    assert cli.main(["reindex", "--store", cfg.store, "--rollback", "v0001"]) == 0
    assert current_version(index_dir) == "v0001"
    assert sorted(storage.read_global_table(cfg.store, ["image_id"]).column("image_id").to_pylist()) == v1_ids
    assert [h["version"] for h in reindex.list_history(cfg) if h["current"]] == ["v0001"]
    assert cli.main(["reindex", "--store", cfg.store, "--list"]) == 0
    with pytest.raises(reindex.ReindexError, match="not a finished version"):
        reindex.rollback(cfg, "v0042")


def _dataset(rows):
    cols = {name: [r.get(name) for r in rows] for name in DATASET_SCHEMA.names}
    return pa.Table.from_pydict(cols, schema=DATASET_SCHEMA)


def test_plan_finds_moves_keeps_unreadable_and_skips_known_failures():
    def row(key, east=None):
        return dict(key=key, path=f"/d/{key}", image_id=storage.image_id_for(key), utm_east=east)

    source = _dataset([row("a.jpg", 1.0), row("b.jpg", 5.0), row("c.jpg"), row("bad.jpg"), row("new.jpg")])
    catalog = pa.table({
        "image_id": [storage.image_id_for(k) for k in ("a.jpg", "b.jpg", "c.jpg", "gone.jpg")],
        "path": ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg", "/d/gone.jpg"],
        "content_hash": ["ha", "hb", "hc", "hg"], "shard": [0, 0, 1, 2], "row": [0, 1, 4, 8],
        "utm_east": [1.0, 2.0, None, None], "utm_north": [None] * 4, "heading": [None] * 4,
        "timestamp": pa.array([None] * 4, pa.string()), "place_id": pa.array([None] * 4, pa.string())})
    hashes = [("ha", None), ("hb", None), (None, "read: file not found"), ("hbad", None), ("hnew", None)]
    failures = pa.table({"path": ["/d/bad.jpg"], "content_hash": ["hbad"], "stage": ["decode"], "reason": ["x"]},
                        schema=reindex.FAILURES_SCHEMA)
    plan = reindex.plan_changes(source, catalog, hashes, failures)
    assert plan.to_extract.column("key").to_pylist() == ["new.jpg"]  # bad.jpg: same bytes as when it failed
    assert plan.skipped_failures == 1
    assert plan.moved.column("image_id").to_pylist() == [storage.image_id_for("b.jpg")]  # same bytes, new position
    assert plan.deleted_ids.tolist() == [storage.image_id_for("gone.jpg")]
    assert plan.unreadable == ["/d/c.jpg"] and plan.unchanged == 1  # c.jpg stays: unreadable is not deleted
    assert plan.affected_shards == [0, 2]


def test_scan_reads_only_files_whose_stamp_changed(tmp_path, gardens_point):
    from pipeline.images import content_hash

    p = tmp_path / "a.jpg"
    shutil.copy(gardens_point / "day_left" / "Image000.jpg", p)
    (real, _, stamp), = reindex.scan_hashes([str(p)], cache={})
    assert real == content_hash(p.read_bytes()) and stamp
    # same size and mtime: the cached hash is trusted (a deliberately wrong one proves no read happened)
    (cached, _, _), = reindex.scan_hashes([str(p)], cache={str(p): (stamp, "blake2b:cached")})
    assert cached == "blake2b:cached"
    shutil.copy(gardens_point / "night_right" / "Image000.jpg", p)  # new bytes, new stamp
    (fresh, _, _), = reindex.scan_hashes([str(p)], cache={str(p): (stamp, "blake2b:cached")})
    assert fresh == content_hash(p.read_bytes()) != real
    (none, why, _), = reindex.scan_hashes([str(tmp_path / "missing.jpg")], cache={})
    assert none is None and "not found" in why


def test_reindex_on_s3_drops_deleted_and_moves_without_extraction(ray_session, s3_bucket, gardens_point):
    """Everything on a real S3 endpoint: the source manifest, the store, the index, CURRENT and the
    lock. Only deletions and a move, so no model runs: the store is written here as extraction would."""
    import fsspec

    from pipeline.datasets import load_dataset
    from pipeline.images import content_hash

    fs = fsspec.filesystem("s3", **storage.storage_options(s3_bucket))
    for i in range(6):
        fs.put(str(gardens_point / "day_left" / f"Image{i:03d}.jpg"), f"{s3_bucket}/data/imgs/Image{i:03d}.jpg")
    source, store = f"{s3_bucket}/data/manifest.csv", f"{s3_bucket}/store"

    def write_manifest(rows):
        fs.pipe(source, ("path,utm_east,utm_north\n" + "".join(f"imgs/Image{i:03d}.jpg,{e},0.0\n" for i, e in rows))
                .encode())

    write_manifest([(i, float(i)) for i in range(6)])
    table = load_dataset(source)
    lay = storage.StoreLayout(store)
    rng = np.random.default_rng(0)
    tokens = storage.create_local_tokens(store, 8, 4, 2)
    for s in (0, 1):
        part = table.slice(3 * s, 3)
        n = part.num_rows
        desc = rng.standard_normal((n, 256)).astype(np.float32)
        hashes = [content_hash(fs.cat(p)) for p in part.column("path").to_pylist()]
        rows = list(range(4 * s, 4 * s + n))
        storage.write_parquet(lay.global_part(s), pa.table({
            **{c: part.column(c) for c in ("image_id", "path", "utm_east", "utm_north", "heading", "timestamp",
                                           "place_id")},
            "width": pa.array([64] * n, pa.int32()), "height": pa.array([48] * n, pa.int32()),
            "global_descriptor": pa.FixedSizeListArray.from_arrays(pa.array(desc.ravel(), pa.float32()), 256),
            "shard": pa.array([s] * n, pa.int32()), "row": pa.array(rows, pa.int64()),
            "content_hash": pa.array(hashes, pa.string()), "tag": pa.nulls(n, pa.string())},
            schema=storage.global_schema(256)))
        tokens[4 * s:4 * s + n] = rng.standard_normal((n, 4, storage.TOKEN_DIM)).astype(np.float16)
    storage.write_json(lay.manifest, dict(
        layout_version=storage.LAYOUT_VERSION, shards=[0, 1], shard_size=4, chunk_rows=2, image_size=[128, 224],
        model=dict(backbone="efficientnet-lite0", checkpoint=None), tokens=4, global_dim=256, rows=8))

    cfg = reindex.ReindexConfig(source=source, store=store, index=dict(held_back_queries=2, num_shards=2))
    first = reindex.run(cfg)  # the store is current; only the index is missing
    assert first.status == "published" and first.version == "v0001" and first.num_images == 6

    write_manifest([(i, 10.0 if i == 1 else float(i)) for i in range(6) if i != 4])  # move 1, delete 4
    second = reindex.run(cfg)
    assert second.status == "published" and second.version == "v0002"
    assert (second.added, second.changed, second.moved, second.deleted) == (0, 0, 1, 1)
    assert second.retired_shards == [0, 1] and sorted(second.new_shards) == [2, 3]
    assert reindex.version_image_ids(cfg.resolved_index_dir, "v0002").tolist() == \
        _ids(*[f"imgs/Image{i:03d}.jpg" for i in (0, 1, 2, 3, 5)])
    rows = {r["image_id"]: r for r in storage.read_global_table(store).to_pylist()}
    moved = rows[storage.image_id_for("imgs/Image001.jpg")]
    assert moved["utm_east"] == 10.0 and moved["row"] == 1  # new position, same Zarr row
    assert current_version(cfg.resolved_index_dir) == "v0002" and "v0001" in list_versions(cfg.resolved_index_dir)
    assert not fs.exists(f"{cfg.resolved_index_dir}/reindex.lock")
    assert reindex.run(cfg).status == "noop"
