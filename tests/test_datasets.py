"""Dataset descriptions: folders (local and S3), VG names, manifests, sequences, bad sources."""
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.datasets import (
    DATASET_SCHEMA,
    DatasetError,
    DatasetSpec,
    default_radius,
    latlon_to_utm,
    load_dataset,
    parse_vg_name,
)

# Pitts30k-style name: east, north, zone 17T, lat, lon, then empty fields.
PITTS = "@0585035.09@4477225.33@17@T@040.44162@-079.99532@000000@00@@@@@@@.jpg"


def _copy(gp, names, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for src, name in names:
        shutil.copy(gp / src, dst / name)


def test_sequence_uses_frame_index(gardens_point):
    t = load_dataset(f"sequence:{gardens_point / 'day_left'}")
    assert t.schema == DATASET_SCHEMA and t.num_rows == 200
    assert t.column("key").to_pylist()[:2] == ["Image000.jpg", "Image001.jpg"]
    np.testing.assert_array_equal(t.column("utm_east").to_numpy(), np.arange(200, dtype=np.float64))
    assert set(t.column("utm_north").to_pylist()) == {0.0}
    assert t.column("image_id").to_pylist()[5] == storage.image_id_for("Image005.jpg")
    assert default_radius(f"sequence:{gardens_point}") == 2.0 and default_radius(str(gardens_point)) == 25.0


def test_folder_is_walked_recursively_and_sorted(gardens_point):
    t = load_dataset(str(gardens_point))
    keys = t.column("key").to_pylist()
    assert len(keys) == 600 and keys == sorted(keys) and keys[0] == "day_left/Image000.jpg"
    assert t.column("path").to_pylist()[0] == str(gardens_point / "day_left" / "Image000.jpg")
    assert t.column("utm_east").null_count == 600  # plain names carry no positions


def test_vg_names_give_positions(gardens_point, tmp_path):
    names = [("day_left/Image000.jpg", PITTS),
             ("day_left/Image001.jpg", "@0549681.16@4178298.18@10@S@037.76253@-122.49637@pano@@87.5@@@@201311@@.jpg")]
    _copy(gardens_point, names, tmp_path / "vg" / "sub")
    t = load_dataset(str(tmp_path / "vg"))
    rows = {r["key"]: r for r in t.to_pylist()}
    r = rows["sub/" + PITTS]
    assert (r["utm_east"], r["utm_north"], r["heading"]) == (585035.09, 4477225.33, None)
    r = [v for k, v in rows.items() if "0549681.16" in k][0]
    assert (r["utm_east"], r["heading"], r["timestamp"]) == (549681.16, 87.5, "201311")
    # A folder with a non-VG name: auto falls back to no positions, vg insists.
    _copy(gardens_point, [("day_left/Image002.jpg", "plain.jpg")], tmp_path / "vg")
    assert load_dataset(str(tmp_path / "vg")).column("utm_east").null_count == 3
    with pytest.raises(DatasetError, match="plain.jpg"):
        load_dataset(DatasetSpec(str(tmp_path / "vg"), "vg"))
    assert parse_vg_name("Image000.jpg") is None and parse_vg_name("@x@y@.jpg") is None


def test_latlon_to_utm_is_metric():
    # On zone 17's central meridian (81 W): false easting exactly, and 0.001 deg of latitude at 40 N is
    # the WGS84 meridian arc (111.035 m) times the UTM scale factor 0.9996.
    e, n = latlon_to_utm([40.0, 40.001], [-81.0, -81.0])
    assert abs(e[0] - 500000.0) < 1e-6 and abs(e[1] - 500000.0) < 1e-6
    assert abs((n[1] - n[0]) - 111.035 * 0.9996) < 0.01
    assert abs(latlon_to_utm([0.0], [-81.0])[1][0]) < 1e-6
    # Southern hemisphere: the false northing keeps values positive.
    assert 0 < latlon_to_utm([-33.87], [151.21])[1][0] < 10_000_000
    assert latlon_to_utm([None], [None]) == ([None], [None])


@pytest.mark.parametrize("column", ["condition", "tag"])
def test_manifest_condition_or_tag_column_becomes_tag(tmp_path, column):
    (tmp_path / "m.csv").write_text(f"path,utm_east,utm_north,{column}\n"
                                    "a.jpg,1,0,night\nb.jpg,2,0,\nc.jpg,3,0, winter \n")
    t = load_dataset(str(tmp_path / "m.csv"))
    assert t.schema == DATASET_SCHEMA
    assert t.column("tag").to_pylist() == ["night", None, "winter"]  # blank: no tag; spaces trimmed
    (tmp_path / "both.csv").write_text("path,tag,condition\na.jpg,dusk,night\n")
    assert load_dataset(str(tmp_path / "both.csv")).column("tag").to_pylist() == ["dusk"]
    (tmp_path / "none.csv").write_text("path\na.jpg\n")
    assert load_dataset(str(tmp_path / "none.csv")).column("tag").to_pylist() == [None]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_relative_paths_and_latlon(gardens_point, tmp_path, fmt):
    _copy(gardens_point, [("day_left/Image000.jpg", "a.jpg"), ("day_left/Image001.jpg", "b.jpg")],
          tmp_path / "data" / "imgs")
    table = pa.table({"path": ["imgs/b.jpg", "imgs/a.jpg", str(gardens_point / "day_right" / "Image000.jpg")],
                      "lat": [40.44162, 40.44170, None], "lon": [-79.99532, -79.99532, None],
                      "heading": [90.0, None, 10.0], "place_id": ["007", "008", None]})
    manifest = tmp_path / "data" / f"manifest.{fmt}"
    if fmt == "csv":
        table.to_pandas().to_csv(manifest, index=False)
    else:
        pq.write_table(table, manifest)
    t = load_dataset(str(manifest))
    rows = {r["key"]: r for r in t.to_pylist()}
    a, b = rows["imgs/a.jpg"], rows["imgs/b.jpg"]
    assert a["path"] == str(tmp_path / "data" / "imgs" / "a.jpg")
    assert a["place_id"] == "008" and b["place_id"] == "007" and b["heading"] == 90.0
    assert abs((a["utm_north"] - b["utm_north"]) - 8.9) < 0.2  # 0.00008 deg of latitude
    far = [r for k, r in rows.items() if k.endswith("day_right/Image000.jpg")][0]
    assert far["path"] == str(gardens_point / "day_right" / "Image000.jpg") and far["utm_east"] is None


def test_manifest_with_utm_and_s3_folder(gardens_point, s3_bucket):
    import fsspec
    fs = fsspec.filesystem("s3", **storage.storage_options(s3_bucket))
    fs.put(str(gardens_point / "day_left" / "Image000.jpg"), f"{s3_bucket}/city/x/Image000.jpg")
    fs.put(str(gardens_point / "day_left" / "Image001.jpg"), f"{s3_bucket}/city/Image001.jpg")
    fs.pipe(f"{s3_bucket}/city/notes.txt", b"not an image")
    t = load_dataset(f"{s3_bucket}/city")
    assert t.column("key").to_pylist() == ["Image001.jpg", "x/Image000.jpg"]
    assert t.column("path").to_pylist()[1] == f"{s3_bucket}/city/x/Image000.jpg"
    fs.pipe(f"{s3_bucket}/m.csv", b"path,utm_east,utm_north,timestamp\ncity/Image001.jpg,10.5,20.5,2020-01-01\n")
    m = load_dataset(f"{s3_bucket}/m.csv").to_pylist()[0]
    assert m["path"] == f"{s3_bucket}/city/Image001.jpg" and (m["utm_east"], m["utm_north"]) == (10.5, 20.5)
    assert m["timestamp"] == "2020-01-01"


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_dataset(str(tmp_path / "no_such_folder"))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_dataset(str(tmp_path / "missing.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(f"sequence:{tmp_path / 'empty'}")
    (tmp_path / "nopath.csv").write_text("file,lat\nx.jpg,1\n")
    with pytest.raises(DatasetError, match="no 'path' column"):
        load_dataset(str(tmp_path / "nopath.csv"))
    with pytest.raises(DatasetError, match="kind"):
        DatasetSpec("x", "zip")
