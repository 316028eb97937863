"""Per-request, per-layer CPU store of offloaded K/V with a top-k index over the keys.

`OffloadedStore` keeps K and V once per KV head, (G, cap, row) rows of a store format (`pack`), grows by doubling, and answers
one call per layer for all query heads: `attend(q, k, out_o, out_m, out_s)` finds each head's top-k
keys and computes the partial attention over them (numba, GIL released, parallel over heads).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels

KINDS = ("flat", "hnsw", "graph")
MIN_CAPACITY = 1024  # keys a store has room for from the start
WRITE_CHUNK = 16384  # tokens packed and copied at a time by `write`
# bf16 is kept as its bits (uint16): numpy has no bfloat16; the kernels widen each value as they read it.
# int8: a row's d values, then its float32 scale in 4 more bytes, so that scoring a key is one read.
STORE_DTYPES = {"float32": np.float32, "bf16": np.uint16, "int8": np.int8}


def store_format(kind: str, dtype: str) -> str:
    """The format a store of this kind keeps: hnswlib indexes float32 keys only, so its baseline keeps them."""
    return "float32" if kind == "hnsw" else dtype


def row_format(fmt: str, d: int) -> tuple[torch.dtype, int]:
    """(torch dtype, row length) of one key or value of d numbers in a store format."""
    if fmt == "int8":
        return torch.int8, d + 4
    return (torch.bfloat16 if fmt == "bf16" else torch.float32), d


def pack(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (..., d) -> its rows in the store format, computed where x is (on the GPU for the model's K/V, so
    the copy to the host moves the compact rows). int8: symmetric, one scale per row (a token of a KV
    head): round(x / s) with s = max |x| / 127."""
    if fmt != "int8":
        return x.to(row_format(fmt, 0)[0])
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    return torch.cat([torch.round(xf / s).clamp_(-127, 127).to(torch.int8), s.view(torch.int8)], -1)


def unpack(rows: torch.Tensor, fmt: str, d: int) -> torch.Tensor:
    """Rows of a store format -> their values (..., d) (float32 or bfloat16), where the rows are."""
    if fmt != "int8":
        return rows
    return rows[..., :d].float() * rows[..., d:].contiguous().view(torch.float32)


@dataclass
class IndexParams:
    """Search and build parameters; `ef` is the candidate-list size (>= k is enforced per search)."""

    ef: int = 128
    degree: int = 24          # graph: adjacency slots per key (2 sequence + projected)
    entries: int = 16         # graph: entry keys per graph
    knn: int = 64             # graph: exact top-L keys of each prefill query used for projection
    per_head: str = "kv"      # graph: one graph per "kv" head (union of the group's queries) or per "query" head
    exact_max: int = 16384    # graph: exact heads scan every key up to this many; beyond, graph + occurrences
    hnsw_m: int = 16
    hnsw_ef_construction: int = 100
    threads: int = 0          # build threads for hnswlib (0: all)
    dtype: str = "float32"    # K and V in the store: float32 | bf16 (half the bytes) | int8 (+ a scale per row)

    def __post_init__(self):
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"index params: dtype must be one of {', '.join(STORE_DTYPES)}")
        if self.ef < 1 or self.degree < 3 or self.entries < 1 or self.knn < 2 or self.exact_max < 0:
            raise ValueError("index params: ef >= 1, degree >= 3, entries >= 1, knn >= 2, exact_max >= 0")
        if self.per_head not in ("kv", "query"):
            raise ValueError("index params: per_head must be 'kv' or 'query'")


class OffloadedStore:
    def __init__(self, kind: str, n_kv_heads: int, n_heads: int, head_dim: int,
                 params: IndexParams | None = None, with_values: bool = True, capacity: int = MIN_CAPACITY,
                 exact_heads: np.ndarray | None = None):
        """exact_heads (n_heads,) bool, graph only: heads answered by an exact scan instead of the graph."""
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        if n_heads % n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        self.kind, self.G, self.H, self.d = kind, n_kv_heads, n_heads, head_dim
        self.p = params or IndexParams()
        self.n = 0
        cap = max(capacity, 16)
        self.fmt = store_format(kind, self.p.dtype)
        if self.fmt == "int8" and head_dim % 4:
            raise ValueError("int8 stores need a head_dim that is a multiple of 4 (each row's scale is a float32)")
        self.dtype = STORE_DTYPES[self.fmt]
        self.row = row_format(self.fmt, head_dim)[1]
        self.K = np.zeros((self.G, cap, self.row), self.dtype)
        self.V = np.zeros((self.G, cap, self.row), self.dtype) if with_values else None
        self.A = (self.H if self.p.per_head == "query" else self.G) if kind == "graph" else self.G
        if kind == "graph":
            # zeros from calloc: rows past n cost no resident memory until build_graph or add_nodes writes
            # them, each row whole, before any walk can reach it (so a capacity reserved for a long answer
            # is paid for as it fills)
            self.adj = np.zeros((self.A, cap, self.p.degree), np.int32)
            self.entries = np.full((self.A, self.p.entries), -1, np.int32)
        self.hnsw: list = []
        self._build_s: list[float] = []  # per build call
        self.counts = np.zeros(self.H, np.int64)
        self.exact = np.zeros(self.H, np.uint8) if exact_heads is None else np.asarray(exact_heads, np.uint8)
        self.no_occ = np.empty(0, np.int64)
        self.version = 0  # counts moves of the arrays `describe` gives the addresses of
        self.pinned = False  # described for batch_attend: the arrays must not move (see append)
        self._desc: tuple[int, np.ndarray] | None = None
        self._scratch_for(1, self.p.ef)  # add_nodes' row; direct searches grow it to one per head

    # ------------------------------------------------------------------ memory
    @property
    def capacity(self) -> int:
        return self.K.shape[1]

    def kv_rows(self, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(G, m, row) tensors over the first m keys' and values' rows, for reading them back (`unpack`)."""
        return _tensor(self.K[:, :m]), (_tensor(self.V[:, :m]) if self.V is not None else None)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return pack(x, self.fmt)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        return unpack(rows, self.fmt, self.d)

    def nbytes(self) -> int:
        b = self.K.nbytes + (self.V.nbytes if self.V is not None else 0)
        b += self.visited.nbytes + self.cs.nbytes + self.ci.nbytes + self.cl.nbytes + self.stamps.nbytes
        if self.kind == "graph":
            b += self.adj.nbytes + self.entries.nbytes
        for ix in self.hnsw:  # level-0 links + data, as hnswlib lays them out
            b += ix.get_current_count() * (self.d * 4 + (2 * self.p.hnsw_m + 1) * 4 + 8)
        return b

    def index_nbytes(self) -> int:
        if self.kind == "graph":
            return self.adj[:, : self.n].nbytes + self.entries.nbytes
        if self.kind == "hnsw":
            return sum(ix.get_current_count() * ((2 * self.p.hnsw_m + 1) * 4 + 8) for ix in self.hnsw)
        return 0

    def _grow(self, need: int, exact: bool = False):
        cap = self.capacity
        if need <= cap:
            return
        new = need if exact else max(need, 2 * cap)
        self.K = _resized(self.K, new, 0.0)
        if self.V is not None:
            self.V = _resized(self.V, new, 0.0)
        if self.kind == "graph":
            self.adj = _resized(self.adj, new, 0)  # as in __init__
        for ix in self.hnsw:
            ix.resize_index(new)
        self.visited = np.zeros((self.visited.shape[0], new), np.int32)
        self.stamps[:] = 0
        self.version += 1

    def _scratch_for(self, rows: int, width: int):
        """(Re)allocate search scratch for `rows` searches of list size `width` (grows, never per step). A walk
        keeps a key's neighbours in ci: rows are at least a graph's degree wide."""
        self.width = width = max(width, self.p.degree)
        self.cs = np.empty((rows, width), np.float32)
        self.ci = np.empty((rows, width), np.int64)
        self.cl = np.empty((rows, width), np.int64)
        self.visited = np.zeros((rows, self.capacity), np.int32)
        self.stamps = np.zeros(rows, np.int32)  # per row: its keys with visited == stamp are visited
        self.version += 1

    # ------------------------------------------------------------------ build and insert
    def reserve(self, n: int, extra: int = 0):
        """Room for n prefill keys, plus `extra` for keys inserted later (so decoding never regrows). `write`
        fills them, `build(n, ...)` indexes them."""
        self._grow(n + extra, exact=True)  # what the request said it needs (and was admitted for)
        self.n = 0

    def write(self, start: int, K: torch.Tensor, V: torch.Tensor | None):
        """Keys and values (G, m, d), of any float dtype and on any device, into rows start..start+m-1:
        packed where they are (`pack`), then copied straight into the store."""
        end = start + K.shape[1]
        write_rows(_tensor(self.K[:, start:end]), _tensor(self.V[:, start:end]) if self.V is not None else None,
                   K, V, self.pack)

    def load(self, K: np.ndarray, V: np.ndarray | None, knn: np.ndarray | None):
        """reserve + write + build, for K/V (G, n, d) float32 already in host memory."""
        self.reserve(K.shape[1])
        self.write(0, torch.from_numpy(np.ascontiguousarray(K, np.float32)),
                   torch.from_numpy(np.ascontiguousarray(V, np.float32)) if V is not None else None)
        self.build(K.shape[1], knn)

    def build(self, n: int, knn: np.ndarray | None, graphs: range | None = None):
        """Index the first n keys (filled through `reserve`). knn (A, m, L): exact top-L key ids of sampled
        prefill queries (graph only; rows of -1 are ignored). `graphs`: build only these of the A graphs
        (they are independent: calls for different ones may run at once; each graph is one thread's work)."""
        t0 = time.perf_counter()
        self.n = n
        if self.kind == "graph":
            if knn is None:
                raise ValueError("graph index needs the prefill queries' top keys")
            for a in range(self.A) if graphs is None else graphs:
                kernels.build_graph(np.ascontiguousarray(knn[a], dtype=np.int64), n, self.p.degree,
                                    self.adj[a], self.entries[a])
        elif self.kind == "hnsw":
            import hnswlib

            self.hnsw = []
            for g in range(self.G):
                ix = hnswlib.Index(space="ip", dim=self.d)
                ix.init_index(max_elements=self.capacity, M=self.p.hnsw_m,
                              ef_construction=self.p.hnsw_ef_construction)
                ix.set_num_threads(self.p.threads or -1)
                if n:
                    ix.add_items(self.K[g, :n], np.arange(n))  # float32: hnsw stores keep that
                self.hnsw.append(ix)
        self._build_s.append(time.perf_counter() - t0)  # (one append per call: atomic across threads)

    @property
    def build_seconds(self) -> float:
        return sum(self._build_s)

    def append(self, K_new: np.ndarray | torch.Tensor, V_new: np.ndarray | torch.Tensor | None):
        """Insert keys (and values) (G, b, d) of any float dtype: `append_rows` of their packed rows."""
        K_new, V_new = torch.as_tensor(K_new), (torch.as_tensor(V_new) if V_new is not None else None)
        self.append_rows(self.pack(K_new), self.pack(V_new) if V_new is not None else None)

    def append_rows(self, K_new: torch.Tensor, V_new: torch.Tensor | None) -> float:
        """Insert keys that slid out of the device window, as rows of this store's format (G, b, row) (the
        engine packs them on the device). They become searchable at once. -> seconds it took."""
        b = K_new.shape[1]
        if b == 0:
            return 0.0
        t0 = time.perf_counter()
        start, end = self.n, self.n + b
        if self.pinned and end > self.capacity:  # a batch_attend may be reading the arrays right now
            raise RuntimeError("CPU store full: it was sized for the request at prefill")
        self._grow(end)
        _tensor(self.K[:, start:end]).copy_(K_new)
        if self.V is not None:
            _tensor(self.V[:, start:end]).copy_(V_new)
        self.n = end
        if self.kind == "graph":
            width = min(self.width, 64)
            per = self.A // self.G
            for a in range(self.A):
                kernels.add_nodes(self.K[a // per], self.d, start, end, self.adj[a], self.entries[a], width, self.visited,
                                  self.stamps, self.ci, self.cl)
        elif self.kind == "hnsw":
            for g, ix in enumerate(self.hnsw):
                ix.add_items(self.K[g, start:end], np.arange(start, end))
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ search
    def _ensure_width(self, rows: int, k: int):
        w = max(self.p.ef, k)
        if rows > self.cs.shape[0] or w > self.width:
            self._scratch_for(max(rows, self.cs.shape[0]), max(w, self.width))
        return w

    def search(self, q: np.ndarray, k: int, occ: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k key ids of each head's query q (H, d) -> ids (H, k) int64 best first (-1 past n),
        scanned (H,) int64: keys whose score was computed (-1 where the index does not tell: hnswlib).
        occ: ids of the keys whose token is the current one (exact heads of a graph look there)."""
        H = q.shape[0]
        ids = np.full((H, k), -1, np.int64)
        scanned = np.zeros(H, np.int64)
        kk = min(k, self.n)
        if kk == 0:
            return ids, scanned
        q = np.ascontiguousarray(q, dtype=np.float32)
        w = self._ensure_width(H, kk)
        sc = np.empty((H, k), np.float32)
        if self.kind == "flat":
            kernels.flat_search(q, self.K, self.n, kk, ids, sc, scanned)
        elif self.kind == "graph":
            # rows are heads when H matches; Index's single-head store takes a batch of queries instead
            exact = self.exact if H == self.H else np.zeros(H, np.uint8)
            kernels.graph_search(q, self.K, self.n, kk, self.adj, self.entries, exact, self.p.exact_max,
                                 self.no_occ if occ is None else occ, w, self.visited,
                                 self.stamps, self.cs, self.ci, self.cl, ids, sc, scanned)
        else:
            per = H // self.G
            for g, ix in enumerate(self.hnsw):
                ix.set_ef(max(self.p.ef, kk))
                labels, _ = ix.knn_query(q[g * per:(g + 1) * per], k=kk)
                ids[g * per:(g + 1) * per, :kk] = labels
            scanned[:] = -1
        return ids, scanned

    def attend(self, q: np.ndarray, k: int, scale: float, out_o: np.ndarray, out_m: np.ndarray,
               out_s: np.ndarray, occ: np.ndarray | None = None):
        """Per head: top-k over the stored keys, then partial attention -> out_o (H, d), out_m/out_s (H,).
        occ as in `search`.

        One native call for all heads (hnsw: one hnswlib call per KV head, then one native call)."""
        kk = min(k, self.n)
        if kk == 0:
            out_o[:] = 0.0
            out_m[:] = -np.inf
            out_s[:] = 0.0
            return
        w = self._ensure_width(self.H, kk)
        scale = np.float32(scale)
        # k covering every key: the answer is all keys, whatever the index (hnswlib cannot return k = n)
        if self.kind == "flat" or kk == self.n:
            kernels.flat_attend(q, self.K, self.V, self.n, kk, scale, self.cs, self.ci, out_o, out_m, out_s)
        elif self.kind == "graph":
            kernels.graph_attend(q, self.K, self.V, self.n, kk, scale, self.adj, self.entries, self.exact,
                                 self.p.exact_max, self.no_occ if occ is None else occ, w, self.visited,
                                 self.stamps, self.cs, self.ci, self.cl, out_o, out_m, out_s)
        else:
            per = self.H // self.G
            for g, ix in enumerate(self.hnsw):
                ix.set_ef(max(self.p.ef, kk))
                labels, _ = ix.knn_query(q[g * per:(g + 1) * per], k=kk)
                self.ci[g * per:(g + 1) * per, :kk] = labels
            self.counts[:] = kk
            kernels.ids_attend(q, self.K, self.V, self.ci, self.counts, scale, self.cs, out_o, out_m, out_s)

    # ------------------------------------------------------------------ batched lookups
    def describe(self) -> np.ndarray:
        """This store's row of batch_attend's table (addresses and sizes of its arrays). The store is pinned
        from then on: its arrays stay where they are."""
        if self.kind == "hnsw":
            raise ValueError("hnswlib stores are searched by hnswlib, not by batch_attend")
        if self._desc is None or self._desc[0] != self.version:
            d = np.zeros(kernels.DESCRIBE_FIELDS, np.int64)
            d[kernels.D_K], d[kernels.D_V], d[kernels.D_EXACT] = self.K.ctypes.data, self.V.ctypes.data, self.exact.ctypes.data
            if self.kind == "graph":
                d[kernels.D_ADJ], d[kernels.D_ENTRIES] = self.adj.ctypes.data, self.entries.ctypes.data
                d[kernels.D_A], d[kernels.D_R], d[kernels.D_E] = self.A, self.adj.shape[2], self.entries.shape[1]
            d[kernels.D_CAP], d[kernels.D_ROW] = self.capacity, self.row
            self._desc = (self.version, d)
        self.pinned = True
        return self._desc[1]

    def part(self, k: int, n: int, occ: np.ndarray | None, params: IndexParams | None = None) -> np.ndarray:
        """This store's part of a request's row in batch_attend's step table: a search for k of its first n
        keys (n: the same in every layer of a request), occ as in `search`, with the searching request's
        params (default: the store's)."""
        p = params or self.p
        occ = self.no_occ if occ is None else occ
        r = np.zeros(kernels.PART_FIELDS, np.int64)
        r[kernels.P_KIND], r[kernels.P_N] = self.kind == "graph", n
        r[kernels.P_EF], r[kernels.P_EXACT_MAX] = max(p.ef, min(k, n)), p.exact_max
        r[kernels.P_OCC], r[kernels.P_OCC_N] = occ.ctypes.data, len(occ)
        return r


NO_PART = np.zeros(kernels.PART_FIELDS, np.int64)  # a request without a cached part (or without keys)
NO_DESC = np.zeros(kernels.DESCRIBE_FIELDS, np.int64)


def request_row(row: int, k: int, parts: list[np.ndarray]) -> np.ndarray:
    """A request's row of batch_attend's step table: its q/out row, k, and up to PARTS parts (`part`)."""
    r = np.zeros(kernels.REQUEST_FIELDS, np.int64)
    r[kernels.R_ROW], r[kernels.R_K] = row, k
    for i, p in enumerate(parts):
        r[2 + i * kernels.PART_FIELDS: 2 + (i + 1) * kernels.PART_FIELDS] = p
    return r


class BatchScratch:
    """batch_attend's search scratch, one row per numba worker thread: stores keep none for it, so a store
    can be searched by several requests in one call (a cached document's), and a request's memory does not
    grow with its query heads. One per caller (its calls never overlap); grown to the largest store and
    the longest candidate list a call needs, never per step."""

    def __init__(self, head_dim: int):
        import numba

        T = numba.config.NUMBA_NUM_THREADS  # thread ids are below the pool's size
        self.visited = _rows(T, 0, np.int32)
        self.stamps = _rows(T, kernels.STAMP_STRIDE, np.int32).reshape(-1)
        self.cs, self.ci, self.cl = _rows(T, 0, np.float32), _rows(T, 0, np.int64), _rows(T, 0, np.int64)
        self.tmp = _rows(T, head_dim, np.float32)
        self._fitted = None

    def fit(self, req: np.ndarray, desc: np.ndarray):
        """Room for the step table req's searches over the stores desc describes (checked once per table: a
        step's layers share it)."""
        if req is self._fitted:
            return
        T = self.visited.shape[0]
        parts = req[:, 2:].reshape(len(req), kernels.PARTS, kernels.PART_FIELDS)
        n = parts[:, :, kernels.P_N]
        width = int(max(parts[:, :, kernels.P_EF].max(initial=0), np.minimum(req[:, None, kernels.R_K], n).max(initial=0),
                        desc[..., kernels.D_R].max(initial=0)))  # a walk keeps a key's neighbours in ci
        if n.max(initial=0) > self.visited.shape[1]:
            self.visited = _rows(T, int(n.max()), np.int32)
            self.stamps[:] = 0
        if width > self.cs.shape[1]:
            self.cs, self.ci, self.cl = _rows(T, width, np.float32), _rows(T, width, np.int64), _rows(T, width, np.int64)
        self._fitted = req


_LINE = 128  # bytes: a cache line and the one fetched with it (Intel's adjacent-line prefetch)


def _rows(T: int, width: int, dtype) -> np.ndarray:
    """Zeros (T, >= width), one row per thread, each row on cache lines of its own: threads write their
    search lists at every step of a walk, and unpadded rows (then 100-byte lists) shared lines between
    threads. Not a clean A/B: against the per-store rows of 3e70d43 on the same H200 instance, 8 requests
    at 32K decoded at 0.63-0.77x of its rate before the padding and 0.85x after (another instance)."""
    item = np.dtype(dtype).itemsize
    w = -(-width // _LINE) * _LINE  # the same padded width for every dtype: `fit` compares cs's alone
    raw = np.zeros(T * w * item + _LINE, np.uint8)
    off = -raw.ctypes.data % _LINE
    return raw[off: off + T * w * item].view(dtype).reshape(T, w)


def attend_batch(desc: np.ndarray, l: int, req: np.ndarray, n_kv_heads: int, scale: float, q: np.ndarray,
                 out_o: np.ndarray, out_ms: np.ndarray, dtype, scratch: BatchScratch):
    """Layer l's lookups for many requests in one native call: desc (B, PARTS, L, F) from each request's
    stores' `describe` (stacked per layer; NO_DESC where a request has no such part), req (B, R) from
    `request_row`, q (rows, H, d) -> out_o (rows, H, d) and out_ms (rows, 2, H) at each request's row, its
    parts merged. The described stores must stay alive through the call, and all of them keep K/V in
    `dtype` (their .dtype)."""
    scratch.fit(req, desc)
    s = scratch
    kernels.batch_attend(desc, l, req, n_kv_heads, np.float32(scale), q, out_o, out_ms, _LIKE[dtype],
                         s.visited, s.stamps, s.cs, s.ci, s.cl, s.tmp)


_LIKE = {dt: np.empty(0, dt) for dt in STORE_DTYPES.values()}


@torch.inference_mode()  # (a prefill's job in another thread: its tensors may be inference tensors)
def write_rows(dst_k: torch.Tensor, dst_v: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor | None, pack):
    """k/v (G, m, d), of any float dtype and on any device -> dst_k/dst_v (G, m, row) on the host, in the rows
    `pack` makes of them (where k/v are); dst_v None: no values."""
    for src, dst in ((k, dst_k), (v, dst_v)):
        if dst is None:
            continue
        for a in range(0, src.shape[1], WRITE_CHUNK):  # int8's packing makes float32 temporaries: a chunk's
            dst[:, a: a + WRITE_CHUNK].copy_(pack(src[:, a: a + WRITE_CHUNK]))


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory, bfloat16 where it holds bf16 bits."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if a.dtype == np.uint16 else t


def _resized(a: np.ndarray, cap: int, fill) -> np.ndarray:
    shape = a.shape[:1] + (cap,) + a.shape[2:]
    # zeros come from calloc: pages not yet written cost no resident memory
    out = np.zeros(shape, a.dtype) if fill == 0 else np.full(shape, fill, a.dtype)
    out[:, : a.shape[1]] = a
    return out
