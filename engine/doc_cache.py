"""Document cache: prompts kept prefilled and indexed across requests.

A request whose prompt is long enough and finds nothing to reuse leaves its prompt behind as an entry:
its sink and last tokens' K/V (host copies), and the offloaded middle in per-layer stores with their
index (`retrieval`: the graph built from its prefill queries). A later request whose prompt begins with
at least half of an entry's tokens (the same document with a new question, the next turn of a chat)
reuses that prefix: its K/V and its indexed keys, and prefills only the rest. `full` and `streaming`
entries keep every token's K/V instead (they have no store), so a hit skips the prefix's compute only.

Entries are immutable and shared: a request searches an entry's stores beside its own, and the two
partial results merge by log-sum-exp. They are keyed by a hash chain over blocks of BLOCK tokens
(a prefix is reused in whole blocks), counted by reference (requests using them) and evicted least
recently used, never while in use, under a byte budget that is never exceeded: an entry that cannot
fit is not made. Entries count against the host budget of the running requests too: admission evicts
unused ones when a request needs their room. Only the engine thread changes the cache; `stats` may be
read from any thread.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from index import OffloadedStore

from .attention import AttentionConfig

BLOCK = 64          # tokens per hashed block
MIN_TOKENS = 1024   # shorter prompts are cheap to prefill: no entry for them


def fingerprint(cfg: AttentionConfig) -> tuple | None:
    """What decides whether an entry serves a request: the same placement and, for stores, the same
    dtype and index build. None: the mode is not cached (hnswlib's baseline)."""
    kind = cfg.store_kind
    if kind is None:
        return ("raw",)
    if kind == "flat":
        return ("flat", cfg.index.dtype, cfg.sink)
    if kind == "graph":
        p = cfg.index
        return ("graph", p.dtype, cfg.sink, p.degree, p.entries, p.knn, p.per_head, cfg.query_stride,
                cfg.max_queries, cfg.copy_threshold)
    return None


@dataclass(eq=False)
class DocEntry:
    """A prompt's K/V, immutable once in the cache: tokens [0, sink) in sink_k/v, [sink, sink + n) in the
    per-layer `stores` (n = their keys; None for a raw entry) with `occ` their tokens' occurrences, and
    [sink + n, len(tokens)) in tail_k/v. Host tensors (L, G, T, d) in the model's dtype."""

    key: tuple
    tokens: np.ndarray
    sink: int = 0
    sink_k: torch.Tensor | None = None  # the request that makes the entry fills these (SequenceKV)
    sink_v: torch.Tensor | None = None
    tail_k: torch.Tensor | None = None
    tail_v: torch.Tensor | None = None
    stores: list[OffloadedStore] | None = None
    occ: object = None  # engine.kv.Occurrences of the stores' keys, where copying heads need them
    nbytes: int = 0
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    hashes: list[bytes] = field(default_factory=list)

    def size(self, L: int, G: int, d: int, dtype: torch.dtype, sink: int, tail: int):
        """Allocate the host K/V of `sink` first and `tail` last tokens."""
        self.sink = sink
        self.sink_k, self.sink_v = (torch.empty(L, G, sink, d, dtype=dtype) for _ in range(2))
        self.tail_k, self.tail_v = (torch.empty(L, G, tail, d, dtype=dtype) for _ in range(2))

    def measure(self) -> int:
        """Its bytes, once filled."""
        b = sum(t.nbytes for t in (self.sink_k, self.sink_v, self.tail_k, self.tail_v))
        if self.stores is not None:
            b += sum(st.nbytes() for st in self.stores)
        if self.occ is not None:
            b += self.occ.nbytes()
        self.nbytes = b + self.tokens.nbytes
        return self.nbytes

    @property
    def n(self) -> int:
        """Keys in the stores."""
        return self.stores[0].n if self.stores is not None else 0

    def copy_prefix(self, l: int, c: int, k_out: torch.Tensor, v_out: torch.Tensor, to_device=None):
        """Layer l's K/V of tokens [0, c) -> k_out/v_out (c, G, d) (on the model's device). to_device(src,
        out, unpack): how host rows (G, m, row) reach out (m, G, d) there, unpack(rows) giving their values
        on the way (default: a plain copy)."""
        S, n = min(self.sink, c), self.n
        k_out[:S] = self.sink_k[l, :, :S].transpose(0, 1)
        v_out[:S] = self.sink_v[l, :, :S].transpose(0, 1)
        move = to_device or (lambda src, out, unpack=None: out.copy_((unpack(src) if unpack else src).transpose(0, 1)))
        m = min(c, self.sink + n) - S  # from the stores
        if m > 0:
            store = self.stores[l]
            K, V = store.kv_rows(m)  # (G, m, row)
            move(K, k_out[S: S + m], store.unpack)
            move(V, v_out[S: S + m], store.unpack)
        t = c - S - max(m, 0)  # from the tail (every token of a raw entry)
        if t > 0:
            move(self.tail_k[l, :, :t], k_out[c - t: c])
            move(self.tail_v[l, :, :t], v_out[c - t: c])


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0          # entries in the cache
    reserved: int = 0       # entries being made (counted against the budget too)
    cached_tokens: int = 0  # prompt tokens reused, over all hits


class DocCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._by_hash: dict[bytes, DocEntry] = {}
        self._entries: list[DocEntry] = []
        self._lock = threading.Lock()
        self.s = CacheStats()

    @staticmethod
    def chain(key: tuple, ids: list[int] | np.ndarray, blocks: int) -> list[bytes]:
        """The hash chain of the first `blocks` blocks of ids: element i stands for tokens [0, (i+1) * BLOCK)."""
        arr = np.asarray(ids[: blocks * BLOCK], np.int64)
        h = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
        out = []
        for i in range(blocks):
            h = hashlib.blake2b(h + arr[i * BLOCK:(i + 1) * BLOCK].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    @classmethod
    def prompt_chain(cls, key: tuple, ids: list[int]) -> list[bytes]:
        """What `lookup` looks for: the prompt's blocks but its last token's."""
        return cls.chain(key, ids, (len(ids) - 1) // BLOCK)

    def lookup(self, key: tuple, ids: list[int], least: int = 0, take: bool = True,
               hashes: list[bytes] | None = None) -> tuple[DocEntry | None, int]:
        """The entry with the longest prefix of ids in whole blocks, leaving at least one token to prefill,
        and that prefix's length; taken (a reference, and counted) if the prefix is at least half of ids
        and `least` tokens. (None, 0) otherwise: a miss. take=False: only look. hashes: prompt_chain's,
        if already made."""
        N = len(ids)
        hashes = hashes if hashes is not None else self.prompt_chain(key, ids)
        for i in range(len(hashes) - 1, -1, -1):
            e = self._by_hash.get(hashes[i])
            if e is None:
                continue
            c = (i + 1) * BLOCK
            if 2 * c >= N and c >= least and np.array_equal(e.tokens[:c], np.asarray(ids[:c])):
                if not take:
                    return e, c
                with self._lock:
                    e.refs += 1
                    e.last_used = time.monotonic()
                    self.s.hits += 1
                    self.s.cached_tokens += c
                return e, c
            break
        if take:
            with self._lock:
                self.s.misses += 1
        return None, 0

    def held(self) -> int:
        """Bytes the cache holds or has promised (entries being made)."""
        return self.s.bytes + self.s.reserved

    def reserve(self, nbytes: int, room: int) -> bool:
        """Room for an entry of at most nbytes within the budget and within `room` bytes for the whole
        cache (what the running requests leave of the host's), evicting unused entries, least recently
        used first; False (nothing evicted) if even that would not make room."""
        with self._lock:
            if not self._shrink(min(self.budget, room) - nbytes):
                return False
            self.s.reserved += nbytes
            return True

    def shrink(self, limit: int, keep: DocEntry | None = None) -> bool:
        """Evict unused entries but `keep` (the one the request that needs the room would reuse), least
        recently used first, until the cache holds at most `limit` bytes; nothing if that is not enough.
        -> whether it holds at most `limit` bytes."""
        with self._lock:
            return self._shrink(limit, keep)

    def _shrink(self, limit: int, keep: DocEntry | None = None) -> bool:
        idle = sorted((e for e in self._entries if e.refs == 0 and e is not keep), key=lambda e: e.last_used)
        if self.held() - sum(e.nbytes for e in idle) > limit:
            return False
        for e in idle:
            if self.held() <= limit:
                break
            self._evict(e)
        return True

    def unreserve(self, nbytes: int):
        with self._lock:
            self.s.reserved -= nbytes

    def insert(self, entry: DocEntry, reserved: int) -> bool:
        """Add a finished entry, made within `reserved` bytes, taken once by the request that made it.
        False (the entry stays the request's alone) if it took more than was reserved for it."""
        self.unreserve(reserved)  # first: whatever happens next, the reservation is given back once
        nbytes = entry.measure()
        if nbytes > reserved:
            return False
        entry.hashes = self.chain(entry.key, entry.tokens, len(entry.tokens) // BLOCK)
        with self._lock:
            self.s.bytes += nbytes
            self.s.entries += 1
            entry.refs += 1
            entry.last_used = time.monotonic()
            self._entries.append(entry)
            for h in entry.hashes:  # a later entry with the same blocks answers for them
                self._by_hash[h] = entry
            return True

    def release(self, entry: DocEntry):
        with self._lock:
            entry.refs -= 1
            entry.last_used = time.monotonic()

    def _evict(self, e: DocEntry):
        assert e.refs == 0, "an entry in use is never evicted"
        self._entries.remove(e)
        for h in e.hashes:
            if self._by_hash.get(h) is e:
                del self._by_hash[h]
        self.s.bytes -= e.nbytes
        self.s.entries -= 1
        self.s.evictions += 1
        e.stores = None

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**vars(self.s))
