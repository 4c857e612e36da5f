"""Benchmark readers on small synthetic trees in the published layouts."""
from __future__ import annotations

import numpy as np
import pyarrow.csv as pacsv
import pytest
from PIL import Image

from pipeline.benchmarks import BenchmarkLayoutError, parse_vg_name, read_msls, read_vg_benchmark, write_manifests


def _jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


def test_vg_name_fields():
    rec = parse_vg_name("@0584227.34@4477086.67@17@T@40.44@-79.99@pano@@120.5@@@@2013@@.jpg")
    assert rec["utm_east"] == pytest.approx(584227.34) and rec["utm_north"] == pytest.approx(4477086.67)
    assert rec["heading"] == pytest.approx(120.5) and rec["timestamp"] == "2013"
    with pytest.raises(BenchmarkLayoutError, match="not a VG-benchmark"):
        parse_vg_name("IMG_0001.jpg")


@pytest.mark.parametrize("db_name", ["database", "gallery"])
def test_vg_benchmark_folder(tmp_path, db_name):
    root = tmp_path / "pitts30k"
    for i in range(3):
        _jpg(root / "images" / "test" / db_name / f"@{500000 + 10 * i}@{4000000 + i}@17@T@@@@@@@@@@.jpg")
    _jpg(root / "images" / "test" / "queries" / "@500001.5@4000000@17@T@@@@@@@@@@.jpg")
    _jpg(root / "images" / "val" / "queries" / "@1@2@@.jpg")  # another split is not mixed in
    split = read_vg_benchmark(str(root))
    assert split.database.num_rows == 3 and split.queries.num_rows == 1
    assert sorted(split.database.column("utm_east").to_pylist()) == [500000, 500010, 500020]
    assert split.queries.column("utm_east").to_pylist() == [500001.5]
    db_csv, q_csv = write_manifests(split, str(tmp_path / "manifests"))
    back = pacsv.read_csv(db_csv)
    assert back.num_rows == 3 and set(back.column_names) >= {"path", "utm_east", "utm_north"}
    with pytest.raises(BenchmarkLayoutError, match="not a VG-benchmark folder"):
        read_vg_benchmark(str(tmp_path / "nothing"))


def _msls_side(d, keys, panos, subtask_all, east0):
    d.mkdir(parents=True)
    for k in keys:
        _jpg(d / "images" / f"{k}.jpg")
    (d / "raw.csv").write_text(",key,lon,lat,ca,captured_at,pano\n" + "".join(
        f"{i},{k},12.5,55.6,{90 + i},2019-0{i + 1}-01,{p}\n" for i, (k, p) in enumerate(zip(keys, panos))))
    (d / "postprocessed.csv").write_text(",key,easting,northing,night,control_panel,view_direction,unique_cluster\n" + "".join(
        f"{i},{k},{east0 + i},{6170000 + i},False,False,Forward,{i}\n" for i, k in enumerate(keys)))
    (d / "subtask_index.csv").write_text(",key,all,day2night\n" + "".join(
        f"{i},{k},{a},False\n" for i, (k, a) in enumerate(zip(keys, subtask_all))))


def test_msls_val_split(tmp_path):
    root = tmp_path / "msls"
    for city, east0 in (("cph", 340000), ("sf", 550000)):
        base = root / "train_val" / city
        _msls_side(base / "database", [f"{city}db{i}" for i in range(4)], [False, True, False, False],
                   [True, True, True, False], east0)
        _msls_side(base / "query", [f"{city}q{i}" for i in range(2)], [False, False], [True, True], east0)
    # A training city is not part of val.
    _msls_side(root / "train_val" / "london" / "database", ["ldb0"], [False], [True], 0)
    split = read_msls(str(root), "val")
    db_paths = split.database.column("path").to_pylist()
    # Per city: 4 images, one panorama excluded, one outside the subtask -> 2 left.
    assert split.database.num_rows == 4 and split.queries.num_rows == 4
    assert not any("db1" in p or "db3" in p or "ldb" in p for p in db_paths)
    assert all(p.endswith(".jpg") and "/images/" in p for p in db_paths)
    assert set(split.database.column("place_id").to_pylist()) == {"cph", "sf"}
    assert split.queries.column("utm_east").to_pylist()[:2] == [340000.0, 340001.0]
    assert split.queries.column("heading").to_pylist()[0] == 90.0
    with_panos = read_msls(str(root), "val", exclude_panoramas=False)
    assert with_panos.database.num_rows == 6
    with pytest.raises(BenchmarkLayoutError, match="trondheim is missing"):
        read_msls(str(root), "train")
