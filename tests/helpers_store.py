"""A tiny extraction store written with pipeline.storage helpers, for tests that need global
descriptors without running the model (index, search, mining, reindex tests may share it)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline import storage


def write_tiny_store(root: str, shards: Sequence[np.ndarray], keys: Sequence[Sequence[str]] | None = None,
                     shard_numbers: Sequence[int] | None = None, shard_size: int | None = None,
                     manifest_extra: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write one Parquet part per entry of ``shards`` (each an (n, D) array of descriptors) and a
    manifest listing them. Image keys default to ``s{shard}/img{row}.jpg``; ids come from
    ``storage.image_id_for``. Returns ``(image_ids, descriptors)`` in store order."""
    numbers = list(shard_numbers) if shard_numbers is not None else list(range(len(shards)))
    dim = int(shards[0].shape[1])
    size = shard_size or max(1, max(len(x) for x in shards))
    layout = storage.StoreLayout(root)
    all_ids, all_desc = [], []
    for i, (s, desc) in enumerate(zip(numbers, shards)):
        desc = np.asarray(desc, np.float32)
        n = len(desc)
        names = list(keys[i]) if keys is not None else [f"s{s}/img{r:06d}.jpg" for r in range(n)]
        ids = [storage.image_id_for(k) for k in names]
        table = pa.Table.from_pydict({
            "image_id": ids, "path": names,
            "utm_east": [float(r) for r in range(n)], "utm_north": [0.0] * n, "heading": [None] * n,
            "timestamp": [None] * n, "place_id": [None] * n, "width": [64] * n, "height": [48] * n,
            "global_descriptor": pa.FixedSizeListArray.from_arrays(pa.array(desc.ravel(), pa.float32()), dim),
            "shard": [s] * n, "row": list(range(s * size, s * size + n)), "content_hash": ["test"] * n,
            "tag": [None] * n,
        }, schema=storage.global_schema(dim))
        storage.write_parquet(layout.global_part(s), table, {"layout_version": storage.LAYOUT_VERSION})
        all_ids.append(np.asarray(ids, np.int64))
        all_desc.append(desc)
    manifest = {"shards": numbers, "layout_version": storage.LAYOUT_VERSION, "global_dim": dim,
                "shard_size": size, **(manifest_extra or {})}
    storage.write_json(layout.manifest, manifest)
    return np.concatenate(all_ids), np.concatenate(all_desc)


def clustered(n: int, dim: int, n_places: int, noise: float, seed: int) -> np.ndarray:
    """Many near duplicates, as views of one place are: ``n`` noisy copies of ``n_places`` centres."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((n_places, dim)).astype(np.float32)
    x = centres[rng.integers(0, n_places, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


def indexed_city(root, db_rows: int, queries: int, part: int):
    """A synthetic city (``bench/city.py``, T = 64 tokens) under ``root``: database store ``db``
    (160-row parts), query store ``q`` (``part``-row parts, positions stripped) and its index."""
    import sys
    from pathlib import Path

    from pipeline import index
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.city import write_city

    write_city(str(root / "db"), db_rows, tokens=64, part_rows=160)
    write_city(str(root / "q"), queries, tokens=64, part_rows=part, queries_of=db_rows, strip_positions=True)
    index.build(index.IndexConfig(store=str(root / "db"), index_dir=str(root / "index")))
    return root
