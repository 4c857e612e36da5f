"""Which FAISS index to build, and where it runs (GPU or CPU).

The choice follows the vector count and the memory budget for the whole index (all shards
together), cheapest-to-search exact option first:

=========================  ===========================================  ====================
index                      when                                         bytes per vector
=========================  ===========================================  ====================
``Flat``                   N <= 50k (exact; brute force is fast there)   4·D + 8
``IVF{n},Flat``            N <= 2M and raw vectors fit the budget        4·D + 8
``IVF{n},PQ{D/4},RFlat``   N > 2M and raw vectors + codes fit            4·D + D/4 + 8
``IVF{n},SQ8``             8-bit codes fit                               D + 8
``IVF{n},PQ{m}``           the largest m in 64/32/16/8 that fits          m + 8
=========================  ===========================================  ====================

IVF-PQ with exact refinement (IndexRefineFlat) scans short PQ codes, then re-scores the
shortlist with the raw vectors: IVF-Flat accuracy at a fraction of the scan cost for large N.
``n`` (the number of IVF cells) is the power of two at or above sqrt(N), at least 16.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import faiss

from ..config import ConfigError, parse_use_gpu
from ..log import get_logger

log = get_logger(__name__)

FLAT_MAX_VECTORS = 50_000
IVF_FLAT_MAX_VECTORS = 2_000_000
ID_BYTES = 8
_IVF_RE = re.compile(r"IVF(\d+)")


@dataclass(frozen=True)
class IndexChoice:
    factory: str
    bytes_per_vector: float
    reason: str

    @property
    def nlist(self) -> int | None:
        m = _IVF_RE.search(self.factory)
        return int(m.group(1)) if m else None

    def estimated_bytes(self, num_vectors: int) -> int:
        return int(self.bytes_per_vector * num_vectors)


def nlist_for(num_vectors: int) -> int:
    return max(16, 1 << math.ceil(math.log2(max(1.0, math.sqrt(num_vectors)))))


def choose_index(num_vectors: int, dim: int, memory_budget: int, factory: str | None = None,
                 ivf_only: bool = False) -> IndexChoice:
    """Pick a factory string for ``num_vectors`` vectors of ``dim`` within ``memory_budget`` bytes.
    ``factory`` forces one (validated); ``ivf_only`` restricts to plain IVF indices (what
    ``merge_ondisk`` can merge)."""
    if factory:
        return _forced(factory, dim, ivf_only)
    raw = 4 * dim + ID_BYTES
    n = max(1, num_vectors)
    nlist = nlist_for(n)
    if not ivf_only and num_vectors <= FLAT_MAX_VECTORS and raw * n <= memory_budget:
        return IndexChoice("Flat", raw, f"{num_vectors} vectors: exact search is fast enough")
    if raw * n <= memory_budget and (num_vectors <= IVF_FLAT_MAX_VECTORS or ivf_only):
        return IndexChoice(f"IVF{nlist},Flat", raw, "raw vectors fit the budget")
    pq_m = _pq_m(dim, dim // 4)
    if not ivf_only and pq_m and (raw + pq_m) * n <= memory_budget:
        return IndexChoice(f"IVF{nlist},PQ{pq_m},RFlat", raw + pq_m,
                           f"{num_vectors} vectors: PQ scan with exact refinement")
    if (dim + ID_BYTES) * n <= memory_budget:
        return IndexChoice(f"IVF{nlist},SQ8", dim + ID_BYTES, "raw vectors exceed the budget; 8-bit codes fit")
    for m in (64, 32, 16, 8):
        if _pq_m(dim, m) == m and (m + ID_BYTES) * n <= memory_budget:
            return IndexChoice(f"IVF{nlist},PQ{m}", m + ID_BYTES, f"only {m}-byte PQ codes fit the budget")
    raise ConfigError(f"memory_budget {memory_budget} bytes is too small for {num_vectors} vectors of dim {dim} "
                      f"(the smallest index needs about {(8 + ID_BYTES) * n} bytes); raise memory_budget")


def _pq_m(dim: int, m: int) -> int | None:
    m = max(1, m)
    while m > 1 and dim % m:
        m -= 1
    return m if dim % m == 0 else None


def _forced(factory: str, dim: int, ivf_only: bool) -> IndexChoice:
    try:
        probe = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"factory {factory!r} is not a valid FAISS index factory string for dim {dim}: "
                          f"{str(exc).strip().splitlines()[-1]}") from None
    if ivf_only and not isinstance(probe, faiss.IndexIVF):
        raise ConfigError(f"merged=true needs a plain IVF factory (merge_ondisk merges inverted lists); "
                          f"{factory!r} builds {type(probe).__name__}")
    try:
        bytes_per_vector = _bytes_per_vector(probe, dim)
    except RuntimeError:  # an exotic index without sa_code_size: assume raw vectors
        bytes_per_vector = 4 * dim + ID_BYTES
    return IndexChoice(factory, bytes_per_vector, "forced by config")


def _bytes_per_vector(index: faiss.Index, dim: int) -> float:
    if isinstance(index, faiss.IndexRefine):
        return _bytes_per_vector(faiss.downcast_index(index.base_index), dim) + 4 * dim
    if isinstance(index, faiss.IndexFlat):
        return 4 * dim + ID_BYTES
    return index.sa_code_size() + ID_BYTES


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for ``factory`` (inner product) that accepts image ids: IVF indices store ids
    in their inverted lists; anything else gets an IndexIDMap around it."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexIVF):
        return index
    return faiss.IndexIDMap(index)


# ---------------------------------------------------------------- GPU or CPU, one code path
def gpus_to_use(use_gpu: str | bool = "auto") -> int:
    """Number of GPUs FAISS should use here: all it sees under ``auto``/``true``, none under
    ``false`` (``config.parse_use_gpu`` reads the value)."""
    setting = parse_use_gpu(use_gpu)
    if setting is False:
        return 0
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if setting is True and n == 0:
        raise RuntimeError("use_gpu=true but FAISS sees no GPU (is faiss-gpu installed and a GPU visible?)")
    return n


def to_device(index: faiss.Index, use_gpu: str | bool = "auto") -> faiss.Index:
    """The index on all visible GPUs when there are any (and FAISS has GPU code for its type),
    otherwise the CPU index unchanged. Results agree within FAISS's own GPU/CPU tolerance."""
    if gpus_to_use(use_gpu) == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as exc:
        log.warning("FAISS has no GPU version of %s (%s); staying on CPU", type(index).__name__, exc)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    if hasattr(faiss, "index_gpu_to_cpu") and gpus_to_use("auto") > 0:
        try:
            return faiss.index_gpu_to_cpu(index)
        except (RuntimeError, AttributeError):
            return index
    return index
