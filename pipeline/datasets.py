"""Dataset descriptions: one string (or ``DatasetSpec``) that every stage turns into the same table.

``load_dataset(source)`` returns a ``pyarrow.Table`` sorted by ``key`` with the columns of
``DATASET_SCHEMA``:

    key        dataset-relative path (what ``image_id`` is derived from, so ids survive moving the data)
    path       full local path or URL that the extraction reads
    image_id   ``pipeline.storage.image_id_for(key)``
    utm_east, utm_north, heading   float64, null when unknown
    timestamp, place_id            string, null when unknown
    tag        string: the image's condition (night, season, viewpoint), null when the source names none

Accepted sources (``kind="auto"`` picks by the string):

- ``sequence:<folder>``: a frame-aligned sequence (e.g. one Gardens Point traverse). Frame ``i``
  of the sorted images gets ``utm_east = i``, ``utm_north = 0`` and ``place_id = str(i)``, so
  "positives within radius r" means "within r frames"; use radius 2 for Gardens Point
  (``default_radius``).
- ``*.csv`` / ``*.parquet``: a manifest with ``path`` and optional ``utm_east``/``utm_north``
  (or ``lat``/``lon``), ``heading``, ``timestamp``, ``place_id``, and ``tag`` or ``condition``
  (copied into the store's ``tag``; ``tag`` wins when both are given). Relative paths are relative to
  the manifest's folder. Latitude/longitude become WGS84 UTM metres, all rows in the zone of
  the median longitude so distances stay consistent across a zone border.
- any other folder or URL (local or ``s3://``): walked recursively for images. If every file
  name follows the VG-benchmark convention
  ``@utm_east@utm_north@zone_number@zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg``
  the positions come from the names (``kind="vg"`` insists on that); otherwise they are null.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from .storage import filesystem, image_id_for

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_RADIUS_M = 25.0
SEQUENCE_RADIUS = 2.0

DATASET_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("path", pa.string()),
    ("image_id", pa.int64()),
    ("utm_east", pa.float64()),
    ("utm_north", pa.float64()),
    ("heading", pa.float64()),
    ("timestamp", pa.string()),
    ("place_id", pa.string()),
    ("tag", pa.string()),
])

# Manifest columns that name an image's condition, in order of preference.
TAG_COLUMNS = ("tag", "condition")

Kind = Literal["auto", "folder", "vg", "manifest", "sequence"]
_KINDS = ("auto", "folder", "vg", "manifest", "sequence")


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    source: str
    kind: Kind = "auto"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise DatasetError(f"dataset kind must be one of {_KINDS}, got {self.kind!r}")

    @classmethod
    def parse(cls, spec: DatasetSpec | str) -> DatasetSpec:
        if isinstance(spec, DatasetSpec):
            return spec
        text = str(spec)
        if text.startswith("sequence:"):
            return cls(text[len("sequence:"):], "sequence")
        return cls(text)

    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        if self.source.lower().endswith((".csv", ".parquet")):
            return "manifest"
        return "folder"  # a folder whose names all parse as VG names is read as VG (see load_dataset)


def default_radius(spec: DatasetSpec | str) -> float:
    """Positive radius in the dataset's position units: frames for sequences, metres otherwise."""
    return SEQUENCE_RADIUS if DatasetSpec.parse(spec).resolved_kind() == "sequence" else DEFAULT_RADIUS_M


def radius_unit(spec: DatasetSpec | str) -> str:
    """The unit of a dataset's positions, so of its positive radius: ``frames`` or ``metres``."""
    return "frames" if DatasetSpec.parse(spec).resolved_kind() == "sequence" else "metres"


def write_frame_manifest(path, folder, frames) -> str:
    """A manifest CSV (local ``path``) of some frames of a frame-aligned sequence folder: frame
    ``i`` is ``folder/Image{i:03d}.jpg`` at ``utm_east = i``, ``utm_north = 0``, as ``sequence:``
    places it, so a subset (a split, a few frames for a test) keeps its frames' positions.
    Returns ``path`` as a string."""
    import csv
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "utm_east", "utm_north"])
        for i in frames:
            w.writerow([f"{folder}/Image{i:03d}.jpg", i, 0])
    return str(path)


def load_dataset(spec: DatasetSpec | str) -> pa.Table:
    """The dataset table of ``spec`` (see the module docstring); errors name the source."""
    spec = DatasetSpec.parse(spec)
    kind = spec.resolved_kind()
    if kind == "manifest":
        rows = _manifest_rows(spec.source)
    else:
        files = _list_images(spec.source)
        if kind == "sequence":
            rows = [dict(key=k, path=p, utm_east=float(i), utm_north=0.0, place_id=str(i))
                    for i, (k, p) in enumerate(files)]
        else:
            parsed = [parse_vg_name(k.rsplit("/", 1)[-1]) for k, _ in files]
            if kind == "vg":
                bad = [k for (k, _), v in zip(files, parsed) if v is None]
                if bad:
                    raise DatasetError(f"{len(bad)} file(s) under {spec.source} do not follow the VG naming "
                                       f"convention @utm_east@utm_north@...: first is {bad[0]!r}")
            use_vg = kind == "vg" or all(v is not None for v in parsed)
            rows = [dict(key=k, path=p, **(v if use_vg and v else {})) for (k, p), v in zip(files, parsed)]
    return _to_table(rows, spec.source)


# ---------------------------------------------------------------- listing
def _list_images(source: str) -> list[tuple[str, str]]:
    """``(key, path)`` of every image under ``source``, sorted by key."""
    fs, root = filesystem(source)
    if not fs.exists(root):
        raise FileNotFoundError(f"dataset source {source!r} does not exist")
    if not fs.isdir(root):
        raise DatasetError(f"dataset source {source!r} is a file, not a folder of images "
                           "(manifests must end in .csv or .parquet)")
    root = root.rstrip("/")
    prefix = _protocol_prefix(source)
    out = []
    for p in fs.find(root):
        if not p.lower().endswith(IMAGE_EXTENSIONS):
            continue
        key = p[len(root):].lstrip("/")
        if any(part.startswith(".") for part in key.split("/")):
            continue  # hidden files and folders (e.g. .ipynb_checkpoints) are not data
        out.append((key, prefix + p))
    if not out:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source!r}")
    out.sort()
    return out


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url and not url.startswith("file://") else ""


# ---------------------------------------------------------------- VG names
def parse_vg_name(name: str) -> dict | None:
    """Positions from a VG-benchmark file name, or None when ``name`` does not follow it.

    Fields after the leading ``@``: utm_east, utm_north, zone_number, zone_letter, lat, lon,
    pano_id, tile_num, heading, pitch, roll, height, timestamp, note, then the extension.
    Only utm_east and utm_north are required; empty trailing fields are common (Pitts30k)."""
    if not name.startswith("@"):
        return None
    fields = name.split("@")[1:]
    if len(fields) < 3:
        return None
    try:
        east, north = float(fields[0]), float(fields[1])
    except ValueError:
        return None
    if not (math.isfinite(east) and math.isfinite(north)):
        return None

    def field(i: int) -> str | None:
        return fields[i] if i < len(fields) - 1 and fields[i] != "" else None

    heading = None
    if field(8) is not None:
        try:
            heading = float(field(8))
        except ValueError:
            heading = None
    return dict(utm_east=east, utm_north=north, heading=heading, timestamp=field(12), place_id=None)


# ---------------------------------------------------------------- manifests
def _manifest_rows(source: str) -> list[dict]:
    fs, path = filesystem(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"dataset manifest {source!r} does not exist")
    with fs.open(path, "rb") as f:
        if source.lower().endswith(".parquet"):
            import pyarrow.parquet as pq
            table = pq.read_table(f)
        else:
            import pyarrow.csv as pcsv
            # Strings stay strings (place ids like "007" must not become ints).
            table = pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(
                column_types={"path": pa.string(), "place_id": pa.string(), "timestamp": pa.string(),
                              **{c: pa.string() for c in TAG_COLUMNS}},
                strings_can_be_null=True))
    cols = set(table.column_names)
    if "path" not in cols:
        raise DatasetError(f"manifest {source!r} has no 'path' column (columns: {sorted(cols)})")
    n = table.num_rows
    data = {c: table.column(c).to_pylist() for c in cols}
    base = source.rsplit("/", 1)[0] if "://" in source else os.path.dirname(os.path.abspath(source))
    if "utm_east" in cols and "utm_north" in cols:
        east = [_float_or_none(v) for v in data["utm_east"]]
        north = [_float_or_none(v) for v in data["utm_north"]]
    elif "lat" in cols and "lon" in cols:
        east, north = latlon_to_utm(data["lat"], data["lon"])
    else:
        east = north = [None] * n
    tag_col = next((c for c in TAG_COLUMNS if c in cols), None)
    rows = []
    for i in range(n):
        raw = data["path"][i]
        if raw is None or str(raw).strip() == "":
            raise DatasetError(f"manifest {source!r} row {i + 2}: empty path")
        raw = str(raw).strip()
        is_abs = "://" in raw or os.path.isabs(raw)
        full = raw if is_abs else f"{base.rstrip('/')}/{raw}"
        if not is_abs:
            key = os.path.normpath(raw).replace(os.sep, "/")
        elif full.startswith(base.rstrip("/") + "/"):  # absolute but inside the manifest's folder
            key = full[len(base.rstrip("/")) + 1:]
        else:
            key = raw.split("://", 1)[-1].lstrip("/")
        rows.append(dict(
            key=key, path=full, utm_east=east[i], utm_north=north[i],
            heading=_float_or_none(data["heading"][i]) if "heading" in cols else None,
            timestamp=_str_or_none(data["timestamp"][i]) if "timestamp" in cols else None,
            place_id=_str_or_none(data["place_id"][i]) if "place_id" in cols else None,
            tag=_tag_or_none(data[tag_col][i]) if tag_col else None,
        ))
    return rows


def _float_or_none(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _str_or_none(v) -> str | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _tag_or_none(v) -> str | None:
    """A condition label; blank cells are no label."""
    v = _str_or_none(v)
    return None if v is None or not v.strip() else v.strip()


def latlon_to_utm(lat, lon, zone: int | None = None) -> tuple[list, list]:
    """WGS84 latitude/longitude (degrees) to UTM east/north metres (Snyder's series, < 1 mm within
    a zone). Every point uses one zone (``zone`` or the median longitude's) and the false northing
    of the median latitude's hemisphere, so differences between points are metric distances."""
    lat_a = np.array([np.nan if v is None else float(v) for v in lat], dtype=np.float64)
    lon_a = np.array([np.nan if v is None else float(v) for v in lon], dtype=np.float64)
    ok = np.isfinite(lat_a) & np.isfinite(lon_a)
    if not ok.any():
        return [None] * len(lat_a), [None] * len(lat_a)
    if zone is None:
        zone = int((np.median(lon_a[ok]) + 180.0) // 6.0) % 60 + 1
    south = np.median(lat_a[ok]) < 0
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    phi = np.radians(np.where(ok, lat_a, 0.0))
    lam = np.radians(np.where(ok, lon_a, 0.0) - ((zone - 1) * 6 - 180 + 3))
    sin, cos, tan = np.sin(phi), np.cos(phi), np.tan(phi)
    n = a / np.sqrt(1 - e2 * sin ** 2)
    t = tan ** 2
    c = ep2 * cos ** 2
    aa = cos * lam
    e4, e6 = e2 * e2, e2 * e2 * e2
    m = a * ((1 - e2 / 4 - 3 * e4 / 64 - 5 * e6 / 256) * phi
             - (3 * e2 / 8 + 3 * e4 / 32 + 45 * e6 / 1024) * np.sin(2 * phi)
             + (15 * e4 / 256 + 45 * e6 / 1024) * np.sin(4 * phi)
             - (35 * e6 / 3072) * np.sin(6 * phi))
    east = k0 * n * (aa + (1 - t + c) * aa ** 3 / 6
                     + (5 - 18 * t + t * t + 72 * c - 58 * ep2) * aa ** 5 / 120) + 500000.0
    north = k0 * (m + n * tan * (aa ** 2 / 2 + (5 - t + 9 * c + 4 * c * c) * aa ** 4 / 24
                                 + (61 - 58 * t + t * t + 600 * c - 330 * ep2) * aa ** 6 / 720))
    if south:
        north = north + 10_000_000.0
    return ([float(e) if k else None for e, k in zip(east, ok)],
            [float(v) if k else None for v, k in zip(north, ok)])


# ---------------------------------------------------------------- table
def _to_table(rows: list[dict], source: str) -> pa.Table:
    if not rows:
        raise DatasetError(f"dataset {source!r} holds no images")
    rows = sorted(rows, key=lambda r: r["key"])
    keys = [r["key"] for r in rows]
    dup = next((a for a, b in zip(keys, keys[1:]) if a == b), None)
    if dup is not None:
        raise DatasetError(f"dataset {source!r} lists {dup!r} more than once")
    cols = {name: [r.get(name) for r in rows] for name in DATASET_SCHEMA.names if name != "image_id"}
    cols["image_id"] = [image_id_for(k) for k in keys]
    return pa.Table.from_pydict(cols, schema=DATASET_SCHEMA)
