"""Readers for the public place-recognition benchmark layouts.

- VG benchmark (Berton et al., "Deep Visual Geo-localization Benchmark"): Pitts30k, Tokyo 24/7,
  Nordland, St Lucia, ... as prepared by its downloader::

      <root>/images/<split>/database/*.jpg     (some preparations call it gallery/)
      <root>/images/<split>/queries/*.jpg

  with file names ``@utm_east@utm_north@zone_number@zone_letter@lat@lon@pano_id@tile_num@heading
  @pitch@roll@height@timestamp@note@.jpg`` (only the UTM fields are required).
- MSLS (Mapillary Street-Level Sequences), official layout::

      <root>/train_val/<city>/{query,database}/images/<key>.jpg
      <root>/train_val/<city>/{query,database}/{postprocessed.csv,raw.csv,subtask_index.csv}

  positions from postprocessed.csv (easting, northing), heading (``ca``), time and the
  panorama flag from raw.csv. The val split is the cities cph and sf; panoramas are excluded
  by default, as the official loader does.

Each reader returns the database and query tables in the dataset columns (path, utm_east,
utm_north, heading, timestamp, place_id); ``write_manifests`` turns them into manifests that
``r2f run --database ... --queries ...`` takes.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv

from . import storage
from .log import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MSLS_CITIES = {
    "train": ("trondheim", "london", "boston", "melbourne", "amsterdam", "helsinki", "tokyo", "toronto",
              "saopaulo", "moscow", "zurich", "paris", "bangkok", "budapest", "austin", "berlin", "ottawa",
              "phoenix", "goa", "amman", "nairobi", "manila"),
    "val": ("cph", "sf"),
    "test": ("miami", "athens", "buenosaires", "stockholm", "bengaluru", "kampala"),
}
MANIFEST_COLUMNS = ("path", "utm_east", "utm_north", "heading", "timestamp", "place_id")


class BenchmarkLayoutError(ValueError):
    pass


@dataclass
class BenchmarkSplit:
    name: str
    database: pa.Table
    queries: pa.Table


def _table(rows: list[dict]) -> pa.Table:
    return pa.table({
        "path": pa.array([r["path"] for r in rows], pa.string()),
        "utm_east": pa.array([r.get("utm_east") for r in rows], pa.float64()),
        "utm_north": pa.array([r.get("utm_north") for r in rows], pa.float64()),
        "heading": pa.array([r.get("heading") for r in rows], pa.float64()),
        "timestamp": pa.array([r.get("timestamp") for r in rows], pa.string()),
        "place_id": pa.array([r.get("place_id") for r in rows], pa.string()),
    })


def _float_or_none(text: str) -> float | None:
    try:
        return float(text) if text not in ("", None) else None
    except ValueError:
        return None


# ---------------------------------------------------------------- VG benchmark
def parse_vg_name(name: str) -> dict:
    """Fields of a VG-benchmark file name; a name without two numeric UTM fields is an error."""
    fields = name.split("@")
    if len(fields) < 3:
        raise BenchmarkLayoutError(f"{name!r} is not a VG-benchmark file name (@utm_east@utm_north@...)")
    east, north = _float_or_none(fields[1]), _float_or_none(fields[2])
    if east is None or north is None:
        raise BenchmarkLayoutError(f"{name!r}: UTM fields {fields[1]!r}, {fields[2]!r} are not numbers")
    get = lambda i: fields[i] if len(fields) > i else ""  # noqa: E731
    return {"utm_east": east, "utm_north": north, "heading": _float_or_none(get(9)),
            "timestamp": get(13) or None}


def _list_images(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return []
    found = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_SUFFIXES))
    proto = "s3://" if url.startswith("s3://") else ""
    return [proto + p if proto and not p.startswith(proto) else p for p in found]


def read_vg_benchmark(root: str, split: str = "test") -> BenchmarkSplit:
    """Database and queries of one split (train/val/test) of a VG-benchmark dataset folder."""
    base = storage.join(root, "images", split)
    db_dir = next((storage.join(base, d) for d in ("database", "gallery")
                   if storage.exists(storage.join(base, d))), None)
    q_dir = storage.join(base, "queries")
    if db_dir is None or not storage.exists(q_dir):
        raise BenchmarkLayoutError(f"{root} is not a VG-benchmark folder: expected {base}/database and {base}/queries")
    out = {}
    for kind, folder in (("database", db_dir), ("queries", q_dir)):
        rows = []
        for p in _list_images(folder):
            rec = parse_vg_name(p.rsplit("/", 1)[-1])
            rec["path"] = p
            rows.append(rec)
        if not rows:
            raise BenchmarkLayoutError(f"{folder} holds no images")
        out[kind] = _table(rows)
    log.info("VG benchmark %s/%s: %d database, %d queries", root, split, out["database"].num_rows,
             out["queries"].num_rows)
    return BenchmarkSplit(f"vg:{split}", out["database"], out["queries"])


# ---------------------------------------------------------------- MSLS
def _read_csv(url: str) -> pa.Table:
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise BenchmarkLayoutError(f"MSLS file {url} is missing")
    with fs.open(path, "rb") as f:
        data = f.read()
    # Keys are strings even when they look numeric; the first (unnamed) column is pandas' index.
    header = next(csv.reader(io.StringIO(data[:4096].decode(errors="replace").splitlines()[0])))
    types = {"key": pa.string()} if "key" in header else {}
    return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types))


def _msls_side(city_dir: str, side: str, subtask: str, exclude_panoramas: bool, city: str) -> list[dict]:
    d = storage.join(city_dir, side)
    post = _read_csv(storage.join(d, "postprocessed.csv"))
    raw = _read_csv(storage.join(d, "raw.csv"))
    for need, t, name in ((("key", "easting", "northing"), post, "postprocessed.csv"), (("key",), raw, "raw.csv")):
        missing = [c for c in need if c not in t.column_names]
        if missing:
            raise BenchmarkLayoutError(f"{storage.join(d, name)} lacks column(s) {missing}")
    raw_by_key = {k: i for i, k in enumerate(raw.column("key").to_pylist())}
    keep_sub = None
    if storage.exists(storage.join(d, "subtask_index.csv")):
        sub = _read_csv(storage.join(d, "subtask_index.csv"))
        if subtask not in sub.column_names:
            raise BenchmarkLayoutError(f"{storage.join(d, 'subtask_index.csv')} has no subtask {subtask!r}")
        keep_sub = {k for k, v in zip(sub.column("key").to_pylist(), sub.column(subtask).to_pylist())
                    if str(v).lower() in ("true", "1")}
    pano = raw.column("pano").to_pylist() if "pano" in raw.column_names else [False] * raw.num_rows
    ca = raw.column("ca").to_pylist() if "ca" in raw.column_names else [None] * raw.num_rows
    captured = raw.column("captured_at").to_pylist() if "captured_at" in raw.column_names else [None] * raw.num_rows
    rows = []
    for key, east, north in zip(post.column("key").to_pylist(), post.column("easting").to_pylist(),
                                post.column("northing").to_pylist()):
        i = raw_by_key.get(key)
        if i is None:
            raise BenchmarkLayoutError(f"{d}: key {key!r} of postprocessed.csv is not in raw.csv")
        if exclude_panoramas and str(pano[i]).lower() in ("true", "1"):
            continue
        if keep_sub is not None and key not in keep_sub:
            continue
        rows.append({"path": storage.join(d, "images", f"{key}.jpg"), "utm_east": float(east),
                     "utm_north": float(north), "heading": _float_or_none(str(ca[i]) if ca[i] is not None else ""),
                     "timestamp": None if captured[i] is None else str(captured[i]), "place_id": city})
    return rows


def read_msls(root: str, split: str = "val", cities: list[str] | None = None, subtask: str = "all",
              exclude_panoramas: bool = True) -> BenchmarkSplit:
    """Database and queries of MSLS ``split`` (val: cph and sf), from its official CSV layout."""
    if split not in MSLS_CITIES:
        raise BenchmarkLayoutError(f"MSLS split must be one of {sorted(MSLS_CITIES)}, got {split!r}")
    cities = list(cities or MSLS_CITIES[split])
    sub = "test" if split == "test" else "train_val"
    db, q = [], []
    for city in cities:
        city_dir = storage.join(root, sub, city)
        if not storage.exists(city_dir):
            raise BenchmarkLayoutError(f"{root} is not an MSLS folder for split {split!r}: {city_dir} is missing")
        db += _msls_side(city_dir, "database", subtask, exclude_panoramas, city)
        q += _msls_side(city_dir, "query", subtask, exclude_panoramas, city)
    log.info("MSLS %s (%s): %d database, %d queries", split, ",".join(cities), len(db), len(q))
    return BenchmarkSplit(f"msls:{split}", _table(db), _table(q))


# ---------------------------------------------------------------- manifests
def write_manifests(split: BenchmarkSplit, out_dir: str) -> tuple[str, str]:
    """``(database.csv, queries.csv)`` manifests in ``out_dir`` (absolute paths inside)."""
    urls = []
    for kind, table in (("database", split.database), ("queries", split.queries)):
        url = storage.join(out_dir, f"{kind}.csv")
        fs, path = storage.filesystem(url)
        storage.makedirs(fs, path.rsplit("/", 1)[0])
        buf = io.BytesIO()
        pacsv.write_csv(table.select(list(MANIFEST_COLUMNS)), buf)
        with fs.open(path, "wb") as f:
            f.write(buf.getvalue())
        urls.append(url)
    return urls[0], urls[1]


def read_benchmark(layout: str, root: str, split: str | None = None) -> BenchmarkSplit:
    if layout == "vg":
        return read_vg_benchmark(root, split or "test")
    if layout == "msls":
        return read_msls(root, split or "val")
    raise BenchmarkLayoutError(f"unknown benchmark layout {layout!r}; choose vg or msls")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="write database/query manifests for a VG-benchmark or MSLS folder")
    p.add_argument("--layout", choices=("vg", "msls"), required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--split", help="vg: train/val/test (default test); msls: train/val/test (default val)")
    p.add_argument("--out", required=True, help="folder for database.csv and queries.csv")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    split = read_benchmark(args.layout, args.root, args.split)
    db, q = write_manifests(split, args.out)
    print(f"{split.database.num_rows} database images -> {db}\n{split.queries.num_rows} queries -> {q}")
    print(f"next: r2f run --database {db} --queries {q} --out OUT")
    return 0
