"""A synthetic city written with ``pipeline.storage``: the layout the city-scale benchmarks run on.

    write_city(store, num_images, tokens=64)                     # a database: positions, extraction order
    write_city(store, num_queries, queries_of=num_images,        # a query set viewing the same places,
               strip_positions=True)                             # in random order, without positions

The city is a street grid: place ``p`` lies on street ``p // PLACES_PER_STREET`` (even streets
run east, odd streets north, 100 m apart), 10 m after the previous place. Each place is seen
by ``views_per_place`` consecutive database rows (a vehicle drives the streets, so rows are in
extraction order and neighbouring rows are neighbouring places). Descriptors are built so that
retrieval behaves like a city: a view's nearest neighbours are the other views of its place,
then the places of the same street segment (``SEGMENT_PLACES`` places), then the rest.

Local tokens (``tokens`` = T per image, 0 = no Zarr array) follow the same idea: every place has
base tokens (positions in [0, 1], 128-d features); a view adds small noise, so a token similarity
or RANSAC scores views of the same place highest.

Memory: written shard by shard (``part_rows`` rows per Parquet part and per shard); one shard's
rows, descriptors and tokens are held at a time, independent of ``num_images``. Every random
draw is seeded by (seed, place) or (seed, role, row), so a store is the same on every run and a
query set built with ``queries_of=N`` matches the database built with ``num_images=N``.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.timefmt import utc_now

PLACES_PER_STREET = 100
SEGMENT_PLACES = 25
PLACE_SPACING_M = 10.0
STREET_SPACING_M = 100.0


@dataclass
class CityStore:
    store: str
    rows: int
    places: int
    tokens: int
    shards: int
    seconds: float


def place_position(place: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTM east/north of places on the street grid."""
    place = np.asarray(place, np.int64)
    street, along = place // PLACES_PER_STREET, (place % PLACES_PER_STREET) * PLACE_SPACING_M
    offset = (street // 2) * STREET_SPACING_M
    horizontal = street % 2 == 0
    east = np.where(horizontal, along, offset) + 500_000.0
    north = np.where(horizontal, offset, along) + 5_000_000.0
    return east, north


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _place_descriptors(places: np.ndarray, dim: int, seed: int) -> np.ndarray:
    out = np.empty((len(places), dim), np.float32)
    for i, p in enumerate(places):
        seg = np.random.default_rng([seed, 1, int(p) // SEGMENT_PLACES]).standard_normal(dim)
        own = np.random.default_rng([seed, 2, int(p)]).standard_normal(dim)
        out[i] = _unit(_unit(seg) + 0.8 * _unit(own))
    return out


def _place_tokens(place: int, tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 4, int(place)])
    base = np.empty((tokens, storage.TOKEN_DIM), np.float32)
    base[:, :2] = rng.uniform(0.05, 0.95, (tokens, 2))
    base[:, 2] = rng.uniform(0.5, 1.0, tokens)
    base[:, 3:] = _unit(rng.standard_normal((tokens, storage.TOKEN_DIM - 3)))
    return base


def write_city(store: str, num_images: int, *, tokens: int = 64, dim: int = storage.GLOBAL_DIM,
               views_per_place: int = 4, chunk_rows: int = 16, part_rows: int = 256,
               queries_of: int | None = None, strip_positions: bool = False, seed: int = 0) -> CityStore:
    """Write a finished extraction store of ``num_images`` rows at ``store`` (see the module doc).

    ``queries_of=N``: a query set whose images view places of the city of ``N`` database images
    (uniformly drawn, in random order, other noise than the database's views).
    ``strip_positions``: utm_east/utm_north are null (real query sets come without them).
    ``part_rows`` rows per shard and Parquet part; ``chunk_rows`` (Zarr row chunk, the
    extraction default 16) must divide it. ``tokens=0`` writes no local tokens.
    """
    t0 = time.perf_counter()
    if num_images < 1 or part_rows < 1 or chunk_rows < 1 or views_per_place < 1:
        raise ValueError("num_images, part_rows, chunk_rows and views_per_place must be positive")
    if tokens and part_rows % chunk_rows:
        raise ValueError(f"chunk_rows ({chunk_rows}) must divide part_rows ({part_rows})")
    role = "query" if queries_of else "database"
    city_rows = queries_of or num_images
    num_places = max(1, -(-city_rows // views_per_place))
    layout = storage.StoreLayout(store)
    fs, path = storage.filesystem(store)
    if fs.exists(path) and fs.ls(path):
        raise FileExistsError(f"{store} is not empty; write a city into a new folder")
    zarr_tokens = storage.create_local_tokens(store, num_images, tokens, chunk_rows) if tokens else None
    num_shards = -(-num_images // part_rows)
    keys_digest = hashlib.sha256()
    for s in range(num_shards):
        rows = np.arange(s * part_rows, min(num_images, (s + 1) * part_rows), dtype=np.int64)
        if queries_of:
            places = np.random.default_rng([seed, 5, s]).integers(0, num_places, len(rows))
        else:
            places = rows // views_per_place
        # view noise: one generator per shard (the part size is part of the city's identity)
        rng = np.random.default_rng([seed, 3, role == "query", s])
        noise = rng.standard_normal((len(rows), dim)).astype(np.float32)
        desc = _unit(_place_descriptors(places, dim, seed) + 0.25 * _unit(noise)).astype(np.float32)
        names = [f"{role}/street{p // PLACES_PER_STREET:05d}/place{p:08d}_{r:09d}.jpg" for p, r in zip(places, rows)]
        for n in names:
            keys_digest.update(n.encode())
        east, north = place_position(places)
        n = len(rows)
        table = pa.table({
            "image_id": pa.array([storage.image_id_for(k) for k in names], pa.int64()),
            "path": pa.array(names, pa.string()),
            "utm_east": pa.array(east, pa.float64()) if not strip_positions else pa.nulls(n, pa.float64()),
            "utm_north": pa.array(north, pa.float64()) if not strip_positions else pa.nulls(n, pa.float64()),
            "heading": pa.nulls(n, pa.float64()),
            "timestamp": pa.nulls(n, pa.string()),
            "place_id": pa.array([f"p{p}" for p in places], pa.string()) if not strip_positions
            else pa.nulls(n, pa.string()),
            "width": pa.array(np.full(n, 640, np.int32)),
            "height": pa.array(np.full(n, 480, np.int32)),
            "global_descriptor": pa.FixedSizeListArray.from_arrays(pa.array(desc.ravel(), pa.float32()), dim),
            "shard": pa.array(np.full(n, s, np.int32)),
            "row": pa.array(rows),
            "content_hash": pa.array([f"city-{seed}-{role}-{r}" for r in rows], pa.string()),
            "tag": pa.nulls(n, pa.string()),
        }, schema=storage.global_schema(dim))
        storage.write_parquet(layout.global_part(s), table, {"layout_version": storage.LAYOUT_VERSION})
        if zarr_tokens is not None:
            bases = {int(p): _place_tokens(int(p), tokens, seed) for p in np.unique(places)}
            block = np.stack([bases[int(p)] for p in places])
            block[:, :, :2] += rng.normal(0, 0.004, (n, tokens, 2))
            block[:, :, 3:] = _unit(block[:, :, 3:] + 0.3 * _unit(rng.standard_normal((n, tokens, 128), dtype=np.float32)))
            zarr_tokens[rows[0]:rows[-1] + 1] = block.astype(np.float16)
        storage.write_json(layout.progress(s), {"shard": s, "extracted": n, "failed": 0, "tokens": tokens or None})
    storage.write_json(layout.manifest, dict(
        layout_version=storage.LAYOUT_VERSION, dataset=f"synthetic-city:{role}:{city_rows}:{seed}",
        model={"name": "synthetic-city"}, image_size=[480, 640], shard_size=part_rows, chunk_rows=chunk_rows,
        tokens=tokens or None, token_dim=storage.TOKEN_DIM, global_dim=dim, rows=num_images,
        shards=list(range(num_shards)), counts=dict(images=num_images, extracted=num_images, failed=0),
        keys_digest=keys_digest.hexdigest(), finished_at=utc_now()))
    return CityStore(store=store, rows=num_images, places=num_places, tokens=tokens, shards=num_shards,
                     seconds=time.perf_counter() - t0)


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("num_images", type=int)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--part-rows", type=int, default=256)
    p.add_argument("--queries-of", type=int)
    p.add_argument("--strip-positions", action="store_true")
    args = p.parse_args()
    city = write_city(args.store, args.num_images, tokens=args.tokens, part_rows=args.part_rows,
                      queries_of=args.queries_of, strip_positions=args.strip_positions)
    print(f"{city.rows} rows, {city.places} places, {city.shards} parts in {city.seconds:.1f} s -> {city.store}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
