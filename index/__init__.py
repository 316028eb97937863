"""CPU top-k indexes over offloaded keys: exact (flat), hnswlib, and the attention-aware graph.

    from index import build_index
    idx = build_index("graph", keys, queries)   # keys (n, d), queries (m, d) float32
    ids, scanned = idx.search(q, k)             # q (b, d) -> ids (b, k) int64, scanned (b,) int64
    idx.add(new_keys)
"""
from __future__ import annotations

import numpy as np

from .knn import exact_topk, graph_knn, graph_knn_later, warm_up_device
from .store import (KINDS, MIN_CAPACITY, NO_DESC, NO_PART, STORE_DTYPES, BatchScratch, IndexParams, OffloadedStore,
                    attend_batch, pack, request_row, row_format, store_format, write_rows)

__all__ = ["KINDS", "MIN_CAPACITY", "NO_DESC", "NO_PART", "BatchScratch", "IndexParams", "OffloadedStore", "attend_batch",
           "pack", "request_row", "row_format", "store_format", "Index", "build_index", "exact_topk", "graph_knn",
           "graph_knn_later", "warm_up", "warm_up_device", "write_rows"]


def warm_up(part: int = 0, parts: int = 1):
    """Run every kernel once on a tiny random store of each kind and dtype, so that numba compiles them
    (~150 s on 2 cores the first time; its on-disk cache is per source path) or loads them from its cache
    now, not inside the first request or a timed build. `part` of `parts`: only every parts-th (kind,
    dtype), so that processes can share the compiling (the cache's writes are locked: index/kernels.py)."""
    rng = np.random.default_rng(0)
    G, H, n, d, k = 1, 2, 256, 8, 8
    keys = rng.standard_normal((G, n, d), dtype=np.float32)
    q = rng.standard_normal((H, d), dtype=np.float32)
    o, m, s = np.empty((H, d), np.float32), np.empty(H, np.float32), np.empty(H, np.float32)
    combos = [(kind, dtype) for kind in KINDS for dtype in STORE_DTYPES if kind != "hnsw" or dtype == "float32"]
    # flat and graph in float32 and bf16, then int8, then hnsw: every other one is about half of the compiling
    combos.sort(key=lambda c: (c[0] == "hnsw", c[1] == "int8"))
    for kind, dtype in combos[part::parts]:
        store = OffloadedStore(kind, G, H, d, IndexParams(dtype=dtype), capacity=2 * n,
                               exact_heads=np.array([True, False]))
        store.load(keys, keys, graph_knn(q[None], keys, 16, "query") if kind == "graph" else None)
        store.search(q, k)
        store.attend(q, k, 1.0, o, m, s, occ=np.arange(4, dtype=np.int64))
        if kind != "hnsw":
            ms = np.empty((1, 2, H), np.float32)
            desc = np.stack([store.describe(), store.describe()])[None, :, None]
            req = request_row(0, k, [store.part(k, n, None), store.part(k, n // 2, None)])[None]
            attend_batch(desc, 0, req, G, 1.0, q[None], o[None], ms, store.dtype, BatchScratch(d))
        store.append(keys[:, :4], keys[:, :4])


class Index:
    """A single-head index that owns its keys (no values): the standalone face of OffloadedStore."""

    def __init__(self, store: OffloadedStore):
        self.store = store

    @property
    def n(self) -> int:
        return self.store.n

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(np.asarray(q, np.float32))
        return self.store.search(q, k)

    def add(self, new_keys: np.ndarray):
        self.store.append(np.asarray(new_keys, np.float32)[None], None)

    def nbytes(self) -> int:
        return self.store.index_nbytes()


def build_index(kind: str, keys: np.ndarray, queries: np.ndarray | None = None, **params) -> Index:
    keys = np.ascontiguousarray(keys, np.float32)
    p = IndexParams(**{**params, "per_head": "kv"})
    store = OffloadedStore(kind, 1, 1, keys.shape[1], p, with_values=False, capacity=keys.shape[0])
    knn = None
    if kind == "graph":
        if queries is None or len(queries) == 0:
            raise ValueError("the graph index is built from prefill queries: pass queries (m, d)")
        knn = exact_topk(np.asarray(queries, np.float32), keys, p.knn)[None]
    store.load(keys[None], None, knn)
    return Index(store)
