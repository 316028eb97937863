"""KV placement of one request: static tokens on the device, the rest in per-layer CPU stores.

Device side, per layer: a buffer of `sink` slots followed by a ring of C slots (C >= window +
evict_block, a multiple of evict_block) with one additive bias row (0 = valid, -inf = free). A new
token takes the next ring slot; when the ring is full, its oldest `evict_block` tokens move to the CPU
store of every layer at once (one copy), where they are indexed and stay searchable. The buffer is one
row of a StaticPool shared by every request of the same (sink, ring) size, so that a decode step writes
and attends for all of them with one op per layer. `full` mode has its own buffer with no sink and a
ring large enough for the whole request, so it never evicts.
"""
from __future__ import annotations

import time
from concurrent.futures import Executor, Future, wait
from typing import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from index import MIN_CAPACITY, NO_DESC, NO_PART, OffloadedStore, graph_knn_later, pack, request_row, row_format, store_format

from .attention import AttentionConfig
from .attention_cuda import offsets
from .doc_cache import DocEntry
from .model import ModelShape


FULL_CHUNK = 4096  # `full` mode's device buffer grows by at least this many slots at a time
NO_POS = -(2**40)  # the position of an empty slot: outside every sliding window


def _round_up(x: int, b: int) -> int:
    return -(-x // b) * b


class Occurrences:
    """The token of every offloaded key, grouped by token: where a copying head looks at decode time
    (the keys at, and right after, the earlier occurrences of the current token). Sorted once after
    prefill; an evicted block is merged in (the decode step pays a copy, not a sort of every key); looked
    up once per decode step for every layer."""

    def __init__(self, capacity: int, limit: int = 1024):
        self.tokens = np.empty(capacity, np.int64)  # token of each store id (the stores share ids)
        self.by_token = np.empty(capacity, np.int64)  # store ids sorted by (token, id)
        self.sorted = np.empty(capacity, np.int64)
        self.n = 0
        self.limit = limit  # a frequent token's most recent occurrences only

    def extend(self, tokens):
        n, b = self.n, len(tokens)
        self.tokens[n: n + b] = tokens
        order = np.argsort(self.tokens[n: n + b], kind="stable")  # the block by (token, id)
        new_tok, new_ids = self.tokens[n: n + b][order], n + order
        # after the equal tokens already there: their ids are smaller, so (token, id) order holds
        at = np.searchsorted(self.sorted[:n], new_tok, "right")
        self.sorted[: n + b] = np.insert(self.sorted[:n], at, new_tok)
        self.by_token[: n + b] = np.insert(self.by_token[:n], at, new_ids)
        self.n = n + b

    def nbytes(self) -> int:
        return self.tokens.nbytes + self.by_token.nbytes + self.sorted.nbytes

    def of(self, token: int, below: int | None = None) -> np.ndarray:
        """The ids of the token's most recent occurrences (among the first `below` ids: a request that sees
        a prefix of a cached document's keys)."""
        s = self.sorted[: self.n]
        lo, hi = np.searchsorted(s, token, "left"), np.searchsorted(s, token, "right")
        if below is not None and below < self.n:  # ids ascend within a token
            hi = lo + np.searchsorted(self.by_token[lo:hi], below)
        return self.by_token[max(lo, hi - self.limit): hi]


class StaticPool:
    """The static parts (sink + ring, n slots, float32) of several requests: K/V (L, R, G, n + 1, d) and
    the bias (R, n + 1), one row per request. A batch attends over rows [0, hi) at once, the free rows among
    them included and their results dropped: cheaper than gathering the rows. Slot n of every row is never
    used (its bias stays -inf): a decode step writes the K/V of the rows it pads with there. Rows are taken
    lowest first, so the rows in use stay packed; the pool grows by doubling and frees its memory when
    empty, unless it is `fixed`: then it holds `fixed` rows from the start and never moves, as the CUDA
    graphs captured over it require."""

    def __init__(self, shape: ModelShape, n: int, device: torch.device, fixed: int = 0):
        self.shape, self.n, self.device, self.fixed = shape, n, device, fixed
        self.trash = n
        self.used: list[bool] = []
        self.k = self.v = self.bias = self.pos = None
        if fixed:
            self._resize(fixed)

    def _resize(self, R: int):
        s = self.shape
        k = torch.zeros(s.n_layers, R, s.n_kv_heads, self.n + 1, s.head_dim, device=self.device)
        v = torch.zeros_like(k)
        bias = torch.full((R, self.n + 1), float("-inf"), device=self.device)
        # the token position in each slot: a sliding-window layer masks the slots that left its window
        pos = torch.full((R, self.n + 1), NO_POS, dtype=torch.long, device=self.device)
        if self.k is not None:
            r = self.k.shape[1]
            k[:, :r], v[:, :r], bias[:r], pos[:r] = self.k, self.v, self.bias, self.pos
        self.k, self.v, self.bias, self.pos = k, v, bias, pos

    def has_room(self) -> bool:
        return not self.fixed or not all(self.used) or len(self.used) < self.fixed

    def alloc(self) -> int:
        row = next((i for i, u in enumerate(self.used) if not u), len(self.used))
        if self.k is None or row >= self.k.shape[1]:
            if self.fixed:
                raise RuntimeError("static pool full")
            self._resize(max(1, 2 * row))  # first: if it fails, the pool is as it was
        if row == len(self.used):
            self.used.append(True)
        self.used[row] = True
        self.k[:, row] = 0.0
        self.v[:, row] = 0.0
        self.bias[row] = float("-inf")
        self.pos[row] = NO_POS
        return row

    def release(self, row: int):
        self.used[row] = False
        while self.used and not self.used[-1]:
            self.used.pop()
        if not self.used and not self.fixed:
            self.k = self.v = self.bias = self.pos = None

    @property
    def rows(self) -> int:
        """Rows a batch attends over: up to the last one in use."""
        return len(self.used)


class StaticPools:
    """The engine's static pools, shared between its requests: one per static-part size, and a `fixed` one
    (see `fix`) that takes every request whose static part fits in it while it has a free row."""

    def __init__(self, shape: ModelShape, device: torch.device):
        self.shape, self.device = shape, device
        self.pools: dict[int, StaticPool] = {}
        self.fixed: StaticPool | None = None

    def fix(self, n: int, rows: int) -> StaticPool:
        """Allocate the fixed pool now: `rows` rows of n slots."""
        self.fixed = StaticPool(self.shape, n, self.device, fixed=rows)
        return self.fixed

    def get(self, n: int) -> StaticPool:
        if self.fixed is not None and n <= self.fixed.n and self.fixed.has_room():
            return self.fixed
        if n not in self.pools:
            self.pools[n] = StaticPool(self.shape, n, self.device)
        return self.pools[n]


def host_bytes(shape: ModelShape, cfg: AttentionConfig, prompt_len: int, total_len: int) -> int:
    """What a request may hold in host memory at most: per layer whose keys leave the device (not a
    sliding-window layer's), for every token that can leave it (a store holds at least 1024), K and V in
    the store's dtype, the graph's links or hnswlib's copy, links and bookkeeping, and a visit stamp; the
    search lists; the token of each key (occurrences) and the pinned eviction buffers."""
    kind = cfg.store_kind
    if kind is None:
        return 0
    S, _, W = static_slots(cfg, total_len)
    n = max(MIN_CAPACITY, offloadable(total_len, prompt_len, S, W))
    L, G, H, d, p = len(shape.global_layers), shape.n_kv_heads, shape.n_heads, shape.head_dim, cfg.index
    fmt = store_format(kind, p.dtype)
    tdt, row = row_format(fmt, d)
    row_bytes = row * tdt.itemsize
    per = G * row_bytes * 2 + 4  # + a visit stamp per key (the store's own searches: insertions)
    fixed = max(p.ef, p.degree) * 20 + 4  # its search list (cs/ci/cl) and stamp; a decode step's are the runner's, per thread
    if kind == "graph":
        A = H if p.per_head == "query" else G
        per += A * p.degree * 4
        fixed += A * p.entries * 4
    elif kind == "hnsw":  # searched head by head: scratch for every head
        per += G * (d * 4 + (2 * p.hnsw_m + 1) * 4 + 8 + 96) + H * 4
        fixed += H * max(p.ef, p.degree, min(cfg.top_k, n)) * 20 + H * 4
    # a sliding-window layer's store stays at 16 keys
    return (L * per * n + shape.n_layers * fixed + (shape.n_layers - L) * per * 16 + 24 * total_len
            + 2 * shape.n_layers * G * cfg.evict_block * row_bytes)


def entry_bytes(shape: ModelShape, cfg: AttentionConfig, prompt_len: int, dtype: torch.dtype) -> int:
    """The most a document-cache entry of this prompt may take (engine/doc_cache.py): its stores as a
    request's of the prompt alone (host_bytes), and the host copies of its sink and window, or of every
    token where the mode has no stores."""
    L, G, d, item = shape.n_layers, shape.n_kv_heads, shape.head_dim, dtype.itemsize
    if cfg.store_kind is None:
        return L * G * prompt_len * d * 2 * item + 8 * prompt_len
    S, _, W = static_slots(cfg, prompt_len)
    return host_bytes(shape, cfg, prompt_len, prompt_len) + L * G * (S + W) * d * 2 * item + 8 * prompt_len


def offloadable(total_len: int, prompt_len: int, S: int, W: int) -> int:
    """Tokens of a request that may leave the device: all but its sink (a prompt shorter than the sink
    leaves the rest of it empty) and a window."""
    return max(0, total_len - min(S, prompt_len) - W)


def window_needed(shape: ModelShape, mode: str, total_len: int) -> int:
    """The smallest static window of a request of total_len tokens: a sliding-window layer attends from the
    static part's ring, which must hold the model's window, or the whole request where it is shorter."""
    return 0 if mode == "full" else min(shape.sliding_window, total_len)


def static_slots(cfg: AttentionConfig, total_len: int) -> tuple[int, int, int]:
    """(sink slots S, ring slots C, window W) of a request of total_len tokens in a partial mode: sized by
    what the request can use, never by a sink or window larger than the request itself."""
    S, W = min(cfg.sink, total_len), min(cfg.window, max(total_len, 1))
    return S, _round_up(W + cfg.evict_block, cfg.evict_block), W


class SequenceKV:
    def __init__(self, shape: ModelShape, cfg: AttentionConfig, total_len: int, device: torch.device,
                 dtype: torch.dtype, copy_scores: np.ndarray | None = None, pools: StaticPools | None = None,
                 prefix: tuple[DocEntry, int] | None = None, new_entry: DocEntry | None = None):
        """copy_scores (n_layers, n_heads), the engine's: in `retrieval` mode the heads at or above
        cfg.copy_threshold scan their offloaded keys exactly (see engine/heads.py). pools: where the static
        part lives (the engine's, shared with the requests it batches; default: a pool of its own).
        prefix (entry, c): the prompt's first c tokens are a cached document's (engine/doc_cache.py): the
        prefill fills their K/V from it, and the entry's keys the request would offload are searched in its
        stores, beside the request's own. new_entry: an entry to fill with this prompt instead (its middle
        goes to the entry's stores, which the request then searches the same way)."""
        self.shape, self.cfg, self.device, self.total_len, self.dtype = shape, cfg, device, total_len, dtype
        L, G, H, d = shape.n_layers, shape.n_kv_heads, shape.n_heads, shape.head_dim
        B = cfg.evict_block
        self.full = cfg.mode == "full"
        # per layer: keys a sliding-window layer attends to (0: every key); such a layer keeps no CPU store
        self.windows = shape.layer_windows
        if cfg.window < window_needed(shape, cfg.mode, total_len):
            raise ValueError(f"the static window ({cfg.window}) must hold the model's sliding window "
                             f"({shape.sliding_window}), or the whole request ({total_len} tokens)")
        # Device buffers are sized by what this request can use, never by a sink or window larger than
        # the request itself. `full` starts with room for a first chunk and grows (see _grow).
        if self.full:
            self.S, self.C, self.W = 0, _round_up(min(max(total_len, 1), FULL_CHUNK), B), total_len
        else:
            self.S, self.C, self.W = static_slots(cfg, total_len)
        n = self.S + self.C
        # The static part of the partial modes is small (sink + window), so it is kept in float32: its
        # scores then never round to bf16 before the softmax. `full` keeps the model dtype (its attention: SDPA, or
        # engine/attention_cuda.py's kernels on CUDA).
        self.pool, self.row = None, -1  # the partial modes take a row of a pool last in __init__ (no leak)
        if self.full:  # per layer: a sliding-window layer keeps a ring of its window (token i in slot i % size)
            most = _round_up(max(total_len, 1), B)  # the most tokens it may hold (next_slot)
            self._k = [torch.zeros(G, min(w, most) or n, d, device=device, dtype=dtype) for w in self.windows]
            self._v = [torch.zeros_like(k) for k in self._k]
            self._bias = torch.full((n,), float("-inf"), device=device)
        self.written = 0  # ring writes so far
        self.evicted = 0  # ring slots handed to the CPU store (or dropped, in streaming mode)
        self.scale = shape.scale
        kind = cfg.store_kind
        # on CUDA one build runs per core at once (ModelRunner's pool), so each build is single-threaded
        params = replace(cfg.index, threads=1) if device.type == "cuda" else cfg.index
        exact = (copy_scores >= cfg.copy_threshold if kind == "graph" and copy_scores is not None
                 else np.zeros((L, H), bool))
        # a sliding-window layer's keys never leave its window: its store stays empty (and minimal)
        self.stores = ([OffloadedStore(kind, G, H, d, params, exact_heads=exact[l],
                                       capacity=16 if self.windows[l] else MIN_CAPACITY) for l in range(L)]
                       if kind else None)
        self.hit, self.prefix_len = prefix if prefix is not None else (None, 0)
        assert not any(self.windows) or (prefix is None and new_entry is None), \
            "the document cache does not serve models with sliding-window layers"
        self.new_entry = new_entry
        if new_entry is not None and kind:
            new_entry.stores = [OffloadedStore(kind, G, H, d, params, exact_heads=exact[l]) for l in range(L)]
        self._copying_heads = bool(exact.any())
        self.cached: DocEntry | None = None  # the entry whose stores it searches beside its own
        self.cached_n = 0  # the entry's keys it sees: those of its own prompt that leave the device
        self.own_from = 0  # the token of its own stores' first key
        # past exact_max keys the exact heads look up the current token's occurrences instead of scanning
        self.occ: Occurrences | None = None  # made by plan_prefill, for the keys its own stores may hold
        self.ring_tok = np.zeros(self.C, np.int64)  # token in each ring slot, for the occurrences
        self.cur_occ: np.ndarray | None = None
        self.cur_cached_occ: np.ndarray | None = None
        pin = device.type == "cuda"
        # the evicted block's rows, packed on the device (the store's format) and copied here in one go
        self.fmt = store_format(kind, cfg.index.dtype) if kind else None
        tdt, row = row_format(self.fmt, d) if kind else (None, 0)
        self.evict_k = torch.empty(L, G, B, row, dtype=tdt, pin_memory=pin) if kind else None
        self.evict_v = torch.empty_like(self.evict_k) if kind else None
        self.split = (0, 0, 0)
        self.n_offloaded = 0  # keys in each layer's store, once its pending inserts are done
        self.executor: Executor | None = None  # where evicted blocks are inserted (the runner sets it; None: inline)
        self._inserts: list[Future] = []  # per layer: the last evicted block's insertion
        self._insert_s = 0.0  # seconds of the insertions waited for since take_insert_seconds
        self._retrieval_s = 0.0
        self._retrieval_calls = 0
        self._desc: tuple[int, np.ndarray] | None = None  # (own stores' versions, describe's table)
        self._table: tuple | None = None  # `full_table`'s (rows, the capacity C they were made for, rings)
        if not self.full:
            self.pool = (pools or StaticPools(shape, device)).get(n)
            self.row = self.pool.alloc()

    # the static part: a row of the pool (looked up each time: the pool may have grown), indexed [l][G, slot];
    # `full` mode's is a list of per-layer buffers
    @property
    def k(self) -> torch.Tensor | list[torch.Tensor]:
        return self._k if self.pool is None else self.pool.k[:, self.row]

    @property
    def v(self) -> torch.Tensor | list[torch.Tensor]:
        return self._v if self.pool is None else self.pool.v[:, self.row]

    @property
    def bias(self) -> torch.Tensor:
        return self._bias if self.pool is None else self.pool.bias[self.row]

    @property
    def pos(self) -> torch.Tensor:
        return self.pool.pos[self.row]

    # ------------------------------------------------------------------ prefill
    def plan_prefill(self, ids: list[int]) -> tuple[int, int, int]:
        """Split the prompt into (sink, offloaded to its own stores, window) counts. With a cached document,
        the keys before `own_from` that leave the device are the entry's (cached_n of them)."""
        N = len(ids)
        if self.full:
            if N > self.total_len:
                raise ValueError("full-mode KV buffer too small for the prompt")
            self._grow(N + 1)
        sink = min(self.S, N)
        win = min(self.W, N - sink)
        mid_end = N - win
        if self.stores is not None and self.new_entry is not None:
            self.cached, self.cached_n = self.new_entry, mid_end - sink
            if self._copying_heads:
                self.new_entry.occ = Occurrences(self.cached_n)
                self.new_entry.occ.extend(ids[sink: mid_end])
        elif self.stores is not None and self.hit is not None and self.hit.stores is not None:
            assert self.hit.sink == sink, "an entry serves requests with its sink"
            self.cached = self.hit
            self.cached_n = max(0, min(self.prefix_len, mid_end, sink + self.hit.n) - sink)
        if self.new_entry is not None:
            L, G, d = self.shape.n_layers, self.shape.n_kv_heads, self.shape.head_dim
            raw = self.stores is None  # no stores: it keeps every token
            self.new_entry.size(L, G, d, self.dtype, 0 if raw else sink, N if raw else win)
        self.own_from = sink + self.cached_n
        if self._copying_heads:
            self.occ = Occurrences(max(1, self.total_len - self.own_from))
        self.split = (sink, mid_end - self.own_from, win)
        self.n_offloaded = self.split[1] if self.stores is not None else 0
        self.written = win
        self.ring_tok[:win] = ids[N - win:]
        if self.occ is not None:
            self.occ.extend(ids[self.own_from: mid_end])
        self.bias[: sink] = 0.0
        self.bias[self.S: self.S + win] = 0.0
        if self.pool is not None:
            self.pos[:sink] = torch.arange(sink)
            self.pos[self.S: self.S + win] = torch.arange(N - win, N)
        return self.split

    def query_rows(self, N: int, start: int = 0) -> torch.Tensor | None:
        """Positions whose prefill queries shape the graph index: the most recent ones (the question
        usually sits at the end) and an even spread over the rest, from `start` (the prefill's first)."""
        if self.cfg.store_kind != "graph" or (self.split[1] == 0 and self.new_entry is None):
            return None
        m = self.cfg.graph_queries(N - start)
        recent = min(m // 4, N - start)
        spread = (torch.linspace(start, N - recent - 1, m - recent).long() if m > recent
                  else torch.empty(0, dtype=torch.long))
        rows = torch.cat([spread, torch.arange(N - recent, N)])
        return torch.unique(rows)

    def place_prefill(self, l: int, k: torch.Tensor, v: torch.Tensor, q_rows: torch.Tensor | None,
                      pool: Executor, reads: list[Future], builds: list[Future], copy: Callable[..., Future]):
        """k/v (N, G, d) of layer l; q_rows (m, H, d) sampled roped queries. Static tokens go to the device
        buffer; the offloaded middle goes to the CPU stores (the request's own, or the entry it makes), indexed
        in `pool`. Everything bound for the host (the stores' rows, the entry's K/V) is copied by
        `copy(dst_k, dst_v, k, v, pack)` (`write_rows`'s arguments, queued: -> its future). Each
        job's future joins `reads` (the copies: k/v must not change or go before they are done) or `builds` as
        it is queued."""
        sink, mid, win = self.split
        N = k.shape[0]
        if self.full and self.windows[l]:  # its ring: the last tokens, each in its slot
            t = min(N, self.k[l].shape[1])
            slots = torch.arange(N - t, N, device=self.device) % self.k[l].shape[1]
            self.k[l][:, slots], self.v[l][:, slots] = k[N - t:].transpose(0, 1), v[N - t:].transpose(0, 1)
        else:
            self.k[l][:, :sink], self.v[l][:, :sink] = k[:sink].transpose(0, 1), v[:sink].transpose(0, 1)
            self.k[l][:, self.S: self.S + win] = k[N - win:].transpose(0, 1)
            self.v[l][:, self.S: self.S + win] = v[N - win:].transpose(0, 1)
        e = self.new_entry
        if e is not None:
            same = lambda x: x  # noqa: E731 (the entry keeps the model's dtype)
            if e.stores is None:  # no stores (full, streaming): the entry keeps every token's K/V
                reads.append(copy(e.tail_k[l], e.tail_v[l], k.transpose(0, 1), v.transpose(0, 1), same))
            else:
                reads.append(copy(e.sink_k[l], e.sink_v[l], k[:sink].transpose(0, 1), v[:sink].transpose(0, 1), same))
                reads.append(copy(e.tail_k[l], e.tail_v[l], k[N - win:].transpose(0, 1), v[N - win:].transpose(0, 1),
                                  same))
                self._fill(e.stores[l], k[sink: N - win], v[sink: N - win], q_rows, 0, pool, copy, reads, builds)
        if self.stores is not None and not self.windows[l]:
            # room for every token this request may still evict: a store that a batched lookup has described
            # never moves (a short prompt with a long answer too)
            extra = offloadable(self.total_len, N, self.S, self.W) - self.cached_n - mid
            self._fill(self.stores[l], k[self.own_from: self.own_from + mid], v[self.own_from: self.own_from + mid],
                       q_rows, extra, pool, copy, reads, builds)

    def _fill(self, store: OffloadedStore, k: torch.Tensor, v: torch.Tensor, q_rows: torch.Tensor | None,
              extra: int, pool: Executor, copy, reads: list[Future], builds: list[Future]):
        """Room in the store for k/v (m, G, d) and `extra` keys more; their copy into it (its future into
        `reads`) and the index build queued in `pool`, a job per graph (the graph's input, each query's top
        keys, computed here on the device and on its way to the host), their futures into `builds`."""
        m = k.shape[0]
        k_mid, v_mid = k.transpose(0, 1), v.transpose(0, 1)  # (G, m, d)
        store.reserve(m, extra=extra)
        if m == 0:
            return
        copied = copy(*store.kv_rows(m), k_mid, v_mid, store.pack)
        reads.append(copied)
        if store.kind == "graph":  # from the keys as the model made them (the store may keep them compact)
            knn = graph_knn_later(q_rows, k_mid, self.cfg.index.knn, self.cfg.index.per_head)
            builds += [pool.submit(lambda a=a: store.build(m, knn.array(), range(a, a + 1))) for a in range(store.A)]
        else:  # flat and hnswlib: once copied (hnswlib indexes the stored keys), a worker waiting for it meanwhile
            builds.append(pool.submit(lambda: (copied.result(), store.build(m, None))))

    # ------------------------------------------------------------------ decode
    def next_slot(self, token: int) -> int:
        """Reserve the ring slot of the next token for every layer, evicting a block if the ring is full."""
        if self.written - self.evicted == self.C:
            if not self.full:
                self._evict_block()
            elif self.C < self.total_len:
                self._grow(self.written + 1)
            else:
                raise RuntimeError("full-mode KV buffer exhausted")
        slot = self.S + self.written % self.C
        self.ring_tok[slot - self.S] = token
        if self.occ is not None:
            self.cur_occ = self.occ.of(token)
        if self.cached is not None and self.cached.occ is not None:
            self.cur_cached_occ = self.cached.occ.of(token, self.cached_n)
        self.written += 1
        self.bias[slot] = 0.0
        return slot

    def _grow(self, slots: int):
        """`full` mode: room for at least `slots` tokens, by a chunk or a quarter more at a time, never
        past the request's total length (no ring: slot i holds token i)."""
        if slots <= self.C:
            return
        B = self.cfg.evict_block
        C = min(_round_up(max(slots, self.C + FULL_CHUNK, self.C * 5 // 4), B), _round_up(self.total_len, B))
        for l in range(len(self._k)):
            if self.windows[l]:  # a ring never grows
                continue
            for buf in (self._k, self._v):  # one layer at a time: the old and new buffers of one layer at once
                G, n, d = buf[l].shape  # n > self.C where a grow that ran out of memory got this far
                new = torch.zeros(G, C, d, device=self.device, dtype=buf[l].dtype)
                new[:, : min(n, C)] = buf[l][:, :C]
                buf[l] = new
        bias = torch.full((C,), float("-inf"), device=self.device)
        ring_tok = np.zeros(C, np.int64)
        bias[: self.C], ring_tok[: self.C] = self.bias, self.ring_tok
        self._bias, self.ring_tok, self.C = bias, ring_tok, C

    def _evict_block(self):
        """Move the ring's oldest block to every layer's store. The insertions into the indexes run on the
        executor, one job per layer, off the decode step's path: layer l's next lookup waits for its own
        (they overlap the device work and the other layers' lookups)."""
        B = self.cfg.evict_block
        a = self.S + self.evicted % self.C
        if self.stores is not None:
            self._wait_inserts()  # the host buffers below are the previous block's until it is in
            # one device->host copy for all layers, then each layer's store indexes its block
            self.evict_k.copy_(pack(self.k[:, :, a: a + B], self.fmt))
            self.evict_v.copy_(pack(self.v[:, :, a: a + B], self.fmt))
            kh, vh = self.evict_k, self.evict_v
            stores = [(l, st) for l, st in enumerate(self.stores) if not self.windows[l]]
            if self.executor is None:
                for l, store in stores:
                    self._insert_s += store.append_rows(kh[l], vh[l])
            else:  # per layer; None where a sliding-window layer keeps no keys
                self._inserts = [None] * len(self.stores)
                for l, store in stores:
                    self._inserts[l] = self.executor.submit(store.append_rows, kh[l], vh[l])
            self.n_offloaded += B
            if self.occ is not None:
                self.occ.extend(self.ring_tok[a - self.S: a - self.S + B])
        self.bias[a: a + B] = float("-inf")
        self.evicted += B

    def _wait_inserts(self):
        inserts, self._inserts = [f for f in self._inserts if f is not None], []
        wait(inserts)  # all of them, even if one failed: free() then has none to wait for
        for f in inserts:
            self._insert_s += f.result()

    def write(self, l: int, slot: int, k: torch.Tensor, v: torch.Tensor):
        if self.full and self.windows[l]:
            slot %= self.k[l].shape[1]
        self.k[l][:, slot] = k
        self.v[l][:, slot] = v

    def attend_full(self, l: int, q: torch.Tensor) -> torch.Tensor:
        """`full` mode: q (H, d) over every token so far -> (H, d). The query heads of a KV group go in as
        that group's "sequence" (one position, no mask), so SDPA's fused kernels read each K/V once."""
        # a sliding-window layer's ring holds its last keys (their order does not matter to attention)
        n = min(self.written, self.k[l].shape[1])
        G, d = self.k[l].shape[0], q.shape[-1]
        o = F.scaled_dot_product_attention(q.view(1, G, -1, d), self.k[l][None, :, :n], self.v[l][None, :, :n],
                                           scale=self.scale)
        return o.reshape(-1, d)  # SDPA's memory-efficient kernel (float32) returns another layout

    def full_table(self, slot: int, base: torch.Tensor) -> np.ndarray:
        """`full` mode, the fused step (engine/attention_cuda.py): per layer, a row of its table for the token
        about to be written at `slot`: (K and V offsets from base, capacity, keys to read, slot written to).
        The first three change only when the buffers do (`_grow`): kept, and only the last two made per step."""
        if self._table is None or self._table[1] != self.C:  # C changes with every grow
            caps = np.array([k.shape[1] for k in self._k])
            cols = np.stack([offsets(base, self._k), offsets(base, self._v), caps, caps, caps], 1)
            self._table = (cols, self.C, np.array(self.windows) > 0)
        t, _, ring = self._table
        caps = t[:, 2]
        t[:, 4] = np.where(ring, slot % caps, slot)
        # a ring reads every slot it has filled (the one written over is skipped); a buffer, the keys before
        t[:, 3] = np.where(ring, np.minimum(self.written, caps), slot)
        return t

    def lookup(self, l: int, q: np.ndarray, top_k: int, out_o: np.ndarray, out_m: np.ndarray, out_s: np.ndarray):
        """Layer l's CPU part for q (H, d) float32 on the host, once keys are offloaded: top-k offloaded keys
        per head and the partial attention over them -> out_o (H, d), out_m/out_s (H,)."""
        self.wait_insert(l)
        t = time.perf_counter()
        self.stores[l].attend(q, top_k, self.scale, out_o, out_m, out_s, self.cur_occ)
        self.add_retrieval_seconds(time.perf_counter() - t)

    # batched lookups (index.attend_batch): the runner makes one call per layer for many requests
    @property
    def batchable(self) -> bool:
        """Its lookups can join a batched call (flat and graph stores; hnswlib searches on its own)."""
        return self.stores is not None and self.stores[0].kind != "hnsw"

    def describe(self) -> np.ndarray:
        """(PARTS, L, F): every layer's own store and the cached entry's, described for attend_batch (cached
        while no store's arrays move; an entry's never do)."""
        version = sum(st.version for st in self.stores)
        if self._desc is None or self._desc[0] != version:
            self._wait_inserts()  # describing pins the stores that an insert may still be growing
            cached = self.cached.stores if self.cached is not None else [None] * len(self.stores)
            self._desc = (version, np.stack([np.stack([st.describe() for st in self.stores]),
                                             np.stack([c.describe() if c is not None else NO_DESC for c in cached])]))
        return self._desc[1]

    def request(self, row: int, top_k: int) -> np.ndarray:
        """This step's row of attend_batch's request table (q/out row `row`): its own keys and the entry's."""
        p = self.cfg.index  # the request's search settings, in its own store and the entry's
        own = self.stores[0].part(top_k, self.n_offloaded, self.cur_occ, p)
        cached = (self.cached.stores[0].part(top_k, self.cached_n, self.cur_cached_occ, p) if self.cached is not None
                  else NO_PART)
        return request_row(row, top_k, [own, cached])

    @property
    def has_cpu_keys(self) -> bool:
        return not self.full and self.n_offloaded + self.cached_n > 0

    def wait_insert(self, l: int):
        if self._inserts and self._inserts[l] is not None:
            self._inserts[l].result()  # this layer's last evicted block is in its index

    def add_retrieval_seconds(self, secs: float):
        self._retrieval_s += secs
        self._retrieval_calls += 1

    # ------------------------------------------------------------------ accounting
    def take_retrieval_seconds(self) -> float:
        """Mean seconds of one layer's CPU lookups + partial attention since the last call (0 if none)."""
        calls, secs = self._retrieval_calls, self._retrieval_s
        self._retrieval_s, self._retrieval_calls = 0.0, 0
        return secs / calls if calls else 0.0

    def take_insert_seconds(self) -> float:
        """Core-seconds of the evicted blocks' insertions, counted once they are waited for (at the next
        eviction), since the last call."""
        secs, self._insert_s = self._insert_s, 0.0
        return secs

    def build_seconds(self) -> float:
        return sum(s.build_seconds for s in self.stores) if self.stores is not None else 0.0

    def cpu_bytes(self) -> int:
        stores = self.stores  # one read: the engine thread may free them while /metrics asks
        return sum(s.nbytes() for s in stores) if stores is not None else 0

    def offloaded_tokens(self) -> int:
        """Keys it searches on the CPU: its own and the cached entry's it sees (in a global layer)."""
        if self.stores is None:
            return 0
        return next((st.n for st, w in zip(self.stores, self.windows) if not w), 0) + self.cached_n

    def free(self):
        inserts = [f for f in self._inserts if f is not None]
        for f in inserts:  # none outlives the request (they hold its stores)
            f.cancel()
        wait(inserts)
        self._inserts = []
        self.stores = self.cached = self.new_entry = self.hit = None
        if self.pool is not None:
            self.pool.release(self.row)
            self.pool = None
        self._k = self._v = None
