import numpy as np
import pyarrow as pa
import pytest

from pipeline import storage


def _rows(n, shard, dim=256, start=0):
    rng = np.random.default_rng(shard)
    desc = rng.standard_normal((n, dim)).astype(np.float32)
    keys = [f"img{start + i:04d}.jpg" for i in range(n)]
    cols = {
        "image_id": [storage.image_id_for(k) for k in keys], "path": keys,
        "utm_east": [float(i) for i in range(n)], "utm_north": [0.0] * n, "heading": [None] * n,
        "timestamp": [None] * n, "place_id": [None] * n, "width": [640] * n, "height": [480] * n,
        "global_descriptor": list(desc), "shard": [shard] * n, "row": list(range(start, start + n)),
        "content_hash": ["x"] * n, "tag": [None] * n,
    }
    return pa.Table.from_pydict(cols, schema=storage.global_schema(dim)), desc


@pytest.mark.parametrize("where", ["local", "s3"])
def test_store_roundtrip(tmp_path, where, request):
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_bucket") + "/store"
    layout = storage.StoreLayout(root)
    with pytest.raises(storage.StoreError, match="no finished extraction"):
        storage.read_manifest(root)
    t0, d0 = _rows(4, 0)
    t1, d1 = _rows(3, 1, start=4)
    storage.write_parquet(layout.global_part(0), t0, {"layout_version": storage.LAYOUT_VERSION})
    storage.write_parquet(layout.global_part(1), t1)
    arr = storage.create_local_tokens(root, rows=8, tokens=5, chunk_rows=4)
    tok = np.arange(8 * 5 * 131, dtype=np.float32).reshape(8, 5, 131) / 1000
    arr[0:4] = tok[0:4].astype(np.float16)
    arr[4:8] = tok[4:8].astype(np.float16)
    storage.write_json(layout.manifest, {"shards": [0, 1], "layout_version": 1})

    ids, desc = storage.read_global_descriptors(root)
    assert ids.dtype == np.int64 and len(ids) == 7
    np.testing.assert_array_equal(desc, np.concatenate([d0, d1]))
    assert storage.parquet_metadata(layout.global_part(0))["layout_version"] == storage.LAYOUT_VERSION
    got = storage.read_local_tokens(root, np.array([5, 1, 5]))
    np.testing.assert_allclose(got, tok[[5, 1, 5]].astype(np.float16).astype(np.float32))
    assert len(storage.read_errors(root)) == 0


def test_store_of_layout_1_without_tag_still_reads(tmp_path):
    """A store written before the ``tag`` column (layout 1), and one whose generations mix layout-1
    and layout-2 parts (a reindex adopts new shards beside old ones), read with ``tag`` all-null."""
    root = str(tmp_path / "store")
    layout = storage.StoreLayout(root)
    old, d0 = _rows(3, 0)
    old = old.drop_columns(["tag"])  # exactly a layout-1 part
    storage.write_parquet(layout.global_part(0), old, {"layout_version": 1})
    storage.write_json(layout.manifest, {"shards": [0], "layout_version": 1})
    t = storage.read_global_table(root)
    assert t.column_names == storage.global_schema().names and t.column("tag").null_count == 3
    assert storage.read_global_table(root, ["tag", "image_id"]).column_names == ["tag", "image_id"]
    np.testing.assert_array_equal(storage.read_global_descriptors(root)[1], d0)

    new, _ = _rows(2, 1, start=3)
    new = new.set_column(new.schema.get_field_index("tag"), "tag", pa.array(["night", None], pa.string()))
    storage.write_parquet(layout.global_part(1), new, {"layout_version": storage.LAYOUT_VERSION})
    storage.write_json(layout.manifest, {"shards": [0, 1], "layout_version": storage.LAYOUT_VERSION})
    assert storage.read_global_table(root).column("tag").to_pylist() == [None, None, None, "night", None]
    assert storage.read_global_part(layout.global_part(0), ["image_id", "tag"]).column("tag").null_count == 3
    assert storage.read_global_part(layout.global_part(1)).column_names == storage.global_schema().names


def test_corrupt_parquet_is_named(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(storage.StoreError, match="bad.parquet"):
        storage.read_parquet(str(p))
    with pytest.raises(storage.StoreError, match="missing.parquet"):
        storage.read_parquet(str(tmp_path / "missing.parquet"))
    with pytest.raises(storage.StoreError, match="bad.parquet"):
        storage.read_global_part(str(p))


def test_image_ids_are_stable():
    assert storage.image_id_for("a/b.jpg") == storage.image_id_for("a/b.jpg")
    assert storage.image_id_for("a/b.jpg") != storage.image_id_for("a/c.jpg")
    assert 0 <= storage.image_id_for("x") < 2 ** 63
