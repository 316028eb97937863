"""Prefill of one sequence and decode steps of a batch of sequences, each over its SequenceKV.

Prefill runs the prompt through one layer at a time (projections and MLP chunked over tokens,
attention chunked over queries), places that layer's KV (static part on the device, the rest in its
CPU store) and queues the layer's index build on the build pool, so builds overlap later layers.
At most two layers' K/V (one being filled, one being copied out) and the hidden states are ever on the
device at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from index import BatchScratch, attend_batch, write_rows

from . import attention_cuda
from .attention import merge_partial_attention, partial_attention
from .kv import NO_POS, SequenceKV, StaticPool
from .model import Transformer

log = logging.getLogger("rattn.engine")
HIDDEN_DEVICE_BYTES = 512 * 2**20
PREFILL_HEADROOM = 2**30  # device memory a prefill chunk's work may need (MLP, attention, the graph input's scores)
# layers per CUDA graph of a `full` step: launching one graph of a whole 8B step takes the host ~1 ms, during
# which the device waits; in pieces, the device starts on the first while the host launches the rest
FULL_GRAPH_LAYERS = 1
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class PrefillStats:
    tokens: int = 0
    compute_s: float = 0.0     # the layers' forward pass
    index_wait_s: float = 0.0  # waiting for index builds after the last layer
    build_s: float = 0.0       # index build time summed over layers (overlaps compute)
    offloaded: int = 0
    cached: int = 0            # prompt tokens whose K/V came from the document cache
    copy_wait_s: float = 0.0   # within compute_s: a layer waiting for an earlier one's copies to the CPU stores


class InlineExecutor(Executor):
    """Runs each job at submit. On a CPU-only machine the prefill already keeps every core busy, and a
    build thread beside it only slows both down (measured: 2 cores, 3.5K tokens, 8.6 s -> 14.4 s)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except Exception as e:
            f.set_exception(e)
        return f


class ModelRunner:
    def __init__(self, model: Transformer, build_threads: int = 0, chunk: int = 2048):
        self.model = model
        self.chunk = chunk
        self.device = model.device
        # on CUDA the CPU is idle during prefill: index builds overlap the next layers there
        # (a core left to the engine thread, which launches the prefill's device work meanwhile)
        self.pool = (ThreadPoolExecutor(max_workers=build_threads or max(1, os.cpu_count() - 1),
                                        thread_name_prefix="rattn-build")
                     if self.device.type == "cuda" else InlineExecutor())
        # evicted blocks go into the indexes here, beside the decode steps; a pool of their own, so that they
        # never queue behind a new request's index builds
        self.insert_pool = (ThreadPoolExecutor(max_workers=os.cpu_count(), thread_name_prefix="rattn-insert")
                            if self.device.type == "cuda" else InlineExecutor())
        # decode on CUDA: SDPA's default picks cuDNN, which plans anew for every K/V length, i.e. every step
        # (H200, 128K, one layer: ~40 ms by default, 1.7 ms forced cuDNN, 0.18 ms flash; bench/attention_kernels.py)
        self._decode_backends = ((lambda: sdpa_kernel(DECODE_BACKENDS)) if self.device.type == "cuda"
                                 else contextlib.nullcontext)
        self._io: _RowIO | None = None  # the eager steps'
        self._graph_io: dict[int, _RowIO] = {}  # per fixed pool: what its graphs read and write
        self._graphs: dict[int, dict] = {}  # per fixed pool: {rows: {has CPU part: [(point, layer, graph)]}}
        self._full_io: _RowIO | None = None  # `full` steps' graphs: what they read and write
        self._full_graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # {rows: the step's graphs, in order}
        # `full` attention in the step's own kernels (engine/attention_cuda.py), where they build (`warm_up_full`)
        self._fused_full = attention_cuda.supported(model.dtype, model.shape.head_dim, self.device)
        self._graph_mem = None  # the graphs' shared memory pool
        self.use_graphs = True  # False: every step eager (graphs stay captured)
        self.scratch = BatchScratch(model.shape.head_dim)  # the batched lookups' search lists, per CPU thread
        self._to_device = _HostToDevice(self.device)  # a cached document's K/V, on their way to a prefill
        # a prefill's K/V on their way to host memory (None: `write_rows` as a job in `pool`)
        self._to_host = _DeviceToHost(self.device) if self.device.type == "cuda" else None
        self._wait_s = 0.0
        # a prefill's hidden states stay on the device up to this size; a longer prompt's live in host memory
        # and pass through the device a chunk at a time (the device then holds a layer's K/V or two, and chunks)
        self.hidden_device_bytes = HIDDEN_DEVICE_BYTES if self.device.type == "cuda" else float("inf")
        self.prefill_window = 0  # benchmarks only: > 0 restricts prefill attention to this many keys back
        self.cudnn_prefill = self.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
        self._attend, self._merge = partial_attention, merge_partial_attention  # `compile()`: fused versions

    @torch.inference_mode()
    def compile(self) -> bool:
        """The elementwise work around the matmuls fused by torch.compile (the model's and the partial-attention
        arithmetic's), compiled here on dummy inputs made as the decode step's are (dynamo guards on layouts and
        on inference-mode tensors): two sizes of each varying dimension make it dynamic, and one row (which
        torch.compile specialises) is compiled apart, so requests find it compiled (tests/test_compile.py).
        False, and the eager functions kept, if it cannot compile here (no compiler for the device, say)."""
        m, s, dev = self.model, self.model.shape, self.device
        eager = (m._qkv, m._finish, self._attend, self._merge)
        try:
            m.compile()
            self._attend, self._merge = torch.compile(partial_attention), torch.compile(merge_partial_attention)
            G, H, d = s.n_kv_heads, s.n_heads, s.head_dim
            for T, n in ((2, 16), (3, 24), (1, 16), (1, 24)):
                h = torch.zeros(T, s.hidden_size, device=dev, dtype=m.dtype)
                q, _, _ = m.qkv(0, h, m.rope(torch.arange(T, device=dev)))
                m.finish_layer(0, h, q)
                with torch.inference_mode(False):  # as a pool's tensors are (dynamo guards on it)
                    k, v, bias = (torch.zeros(*dims, device=dev) for dims in ((T, G, n, d), (T, G, n, d), (T, n)))
                for b in (bias, bias.clone()):  # a pool's bias; a sliding-window layer's, made in the step
                    o, mx, sm = self._attend(q.float(), k, v, b, m.scale)
                # the CPU part's m and s: views of one buffer (pool rows), or gathered (a mixed step)
                ms, o2 = torch.zeros(T, 2, H, device=dev), torch.zeros(T, H, d, device=dev)
                for m2, s2 in ((ms[:, 0], ms[:, 1]), (ms[:, 0].clone(), ms[:, 1].clone())):
                    self._merge(o, mx, sm, o2, m2, s2)
        except Exception:
            log.exception("torch.compile failed: the model runs its eager ops")
            m._qkv, m._finish, self._attend, self._merge = eager
            return False
        return True

    @torch.inference_mode()
    def plan_prefill_attention(self, tokens: int) -> int:
        """cuDNN plans its attention once per shape and thread (torch keeps the plans per thread), ~60 ms each,
        and a prompt's whole chunks each have their own (the keys before them): plan them here, in the thread
        that will prefill, for prompts up to `tokens` long, rather than in the first long prompt (measured:
        its TTFT +4 s at 128K on the H200). -> the tokens planned for (0: cuDNN is not used here)."""
        m, s, c = self.model, self.model.shape, self.chunk
        l = next((i for i in range(s.n_layers) if not m.window_of(i)), None)
        n = tokens // c * c
        if not self.cudnn_prefill or l is None or n == 0:
            return 0
        q, _, _ = m.qkv(l, torch.zeros(c, s.hidden_size, device=self.device, dtype=m.dtype), m.rope_of(0, c)(0, c))
        k = torch.zeros(n, s.n_kv_heads, s.head_dim, device=self.device, dtype=m.dtype)
        for a in range(0, n, c):
            self._prefill_attention(l, a, a + c, q, k, k)
        torch.cuda.synchronize(self.device)
        return n if self.cudnn_prefill else 0

    def prefill(self, ids: list[int], kv: SequenceKV, capture=None,
                on_layer: Callable[[int], None] | None = None) -> tuple[torch.Tensor, PrefillStats]:
        """-> logits (V,) float32 of the last prompt position. `capture(l, start, q, k)`, if given, sees
        every chunk's roped queries and keys (benchmarks dump them). `on_layer(l)` runs after each layer,
        and every 0.2 s while index builds finish (progress; it may raise to end the prefill early)."""
        logits, stats = self.prefill_many(ids, [kv], capture, on_layer)
        return logits, stats[0]

    def prefill_many(self, ids: list[int], kvs: list[SequenceKV], capture=None,
                     on_layer: Callable[[int], None] | None = None):
        """One forward pass over the prompt, placed into several SequenceKVs (e.g. one per attention mode):
        the fork that lets a benchmark decode the same prefill under every mode."""
        steps = self.prefill_steps(ids, kvs, capture)
        last = 0
        try:
            while True:
                done = next(steps)
                if on_layer is not None and (done > last or done == self.model.shape.n_layers):
                    on_layer(done - 1)
                last = done
        except StopIteration as e:
            return e.value
        finally:
            steps.close()

    def prefill_steps(self, ids: list[int], kvs: list[SequenceKV], capture=None
                      ) -> Generator[int, None, tuple[torch.Tensor, list[PrefillStats]]]:
        """The prefill as a generator that yields the number of layers done after every chunk of work
        (and every 0.2 s while index builds finish), so that the engine can run decode steps of other
        requests in between; it returns (logits (V,), [PrefillStats per kv]). Closing it early cancels
        the index builds it queued and waits for those already running (they hold its stores)."""
        futures: list[Future] = []
        try:
            return (yield from self._prefill(ids, kvs, capture, futures))
        finally:
            for f in futures:
                f.cancel()
            wait(futures)

    @torch.inference_mode()
    def _prefill(self, ids, kvs, capture, futures):
        m, s = self.model, self.model.shape
        t0 = time.perf_counter()
        N = len(ids)
        # a cached document's first c tokens: their K/V come from its entry, only the rest is computed
        c = kvs[0].prefix_len
        assert all(kv.prefix_len == c for kv in kvs), "one prefill serves one cached prefix"
        entry = kvs[0].hit
        on_host = (N - c) * s.hidden_size * m.dtype.itemsize > self.hidden_device_bytes
        rope = m.rope_of(c, N)
        sampled = []  # per kv: (rows on host, rows on device, gathered queries) for a graph build, else None
        for kv in kvs:
            kv.executor = self.insert_pool
            kv.plan_prefill(ids)
            rows = kv.query_rows(N, c)
            sampled.append(None if rows is None else (
                rows, rows.to(self.device),
                torch.empty(len(rows), s.n_heads, s.head_dim, device=self.device, dtype=m.dtype)))
        reads: list[list[Future]] = []  # per layer: the jobs that read its K/V (copies to the CPU stores)
        copy_wait = 0.0
        h = None
        try:
            h = _PrefillHidden(m, ids[c:], self.chunk, on_host)
            # (beside the hidden states) a second pair where a layer's K/V go to host memory: stores or a new entry
            bufs = self._prefill_kv(N, any((kv.stores is not None and kv.split[1]) or kv.new_entry is not None
                                           for kv in kvs))
            for l in range(s.n_layers):
                k_all, v_all = bufs[l % len(bufs)]
                if l >= len(bufs):  # the copies out of the pair this layer refills are done
                    t = time.perf_counter()
                    wait(reads[l - len(bufs)])
                    copy_wait += time.perf_counter() - t
                    for f in reads[l - len(bufs)]:
                        f.result()  # a failed copy fails the prefill now
                if c:
                    entry.copy_prefix(l, c, k_all[:c], v_all[:c], self._to_device)
                for i, a in enumerate(range(c, N, self.chunk)):
                    b = min(N, a + self.chunk)
                    x = h.load(l, i)
                    q, k, v = m.qkv(l, x, rope(a, b))
                    k_all[a:b], v_all[a:b] = k, v
                    if capture is not None:
                        capture(l, a, q, k)
                    for rows, rows_dev, q_rows in filter(None, sampled):
                        lo, hi = torch.searchsorted(rows, torch.tensor([a, b])).tolist()
                        q_rows[lo:hi] = q[rows_dev[lo:hi] - a]
                    o = self._prefill_attention(l, a, b, q, k_all, v_all)
                    # the chunk's layer output at once, in place: its input rows are no other chunk's, and no
                    # attention output of the whole prompt is kept (N x hidden on the device)
                    m.finish_layer(l, x, o[0].transpose(0, 1))
                    h.store(l, i)
                    yield l
                copy = lambda *rows: self.pool.submit(write_rows, *rows)  # noqa: E731
                if self._to_host is not None:  # after the layer's work queued so far
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(self.device))
                    copy = lambda *rows, ready=ready: self._to_host.submit(*rows, ready=ready)  # noqa: E731
                reads.append([])
                for kv, smp in zip(kvs, sampled):
                    kv.place_prefill(l, k_all, v_all, smp[2] if smp else None, self.pool, reads[-1], futures, copy)
                futures += reads[-1]
                yield l + 1
            logits = m.logits(h.last())
        except BaseException:  # (closed early too) no copy may still read the K/V buffers once they are freed
            copies = [f for r in reads for f in r]
            for f in copies:
                f.cancel()
            wait(copies)
            raise
        finally:
            if h is not None:
                h.close()
        t1 = time.perf_counter()
        pending = futures
        while pending:  # a failed build fails the request; the wait yields, so it keeps the heartbeat
            done, pending = wait(pending, timeout=0.2)
            for f in done:
                f.result()
            if pending:
                yield s.n_layers
        t2 = time.perf_counter()
        return logits, [PrefillStats(N, t1 - t0, t2 - t1, kv.build_seconds(), kv.offloaded_tokens(), c, copy_wait)
                        for kv in kvs]

    def _prefill_kv(self, N: int, offloads: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefill's K and V of a whole layer, (N, G, d) each: one pair, and where the prompt offloads
        keys to a pool of threads (CUDA) a second one if it fits with PREFILL_HEADROOM to spare, so that a
        layer's copies to the CPU stores read one pair while the next layer fills the other (else the next
        layer waits for them)."""
        s, m = self.model.shape, self.model
        pair = lambda: tuple(torch.empty(N, s.n_kv_heads, s.head_dim, device=self.device, dtype=m.dtype)
                             for _ in range(2))
        bufs = [pair()]
        if offloads and not isinstance(self.pool, InlineExecutor):
            try:
                bufs.append(pair())
                if self.device.type == "cuda":  # the chunks' work beside it; freed to the allocator's cache,
                    torch.empty(PREFILL_HEADROOM, dtype=torch.uint8, device=self.device)  # which keeps it for them
            except torch.OutOfMemoryError:
                del bufs[1:]
        return bufs

    def _prefill_attention(self, l: int, a: int, b: int, q, k_all, v_all) -> torch.Tensor:
        """Chunk [a, b)'s queries q (b - a, H, d) of layer l over their keys -> (1, H, b - a, d). On CUDA a
        global layer's chunk runs as two cuDNN calls, as `causal_chunk_cudnn` says; else SDPA with the mask."""
        # whole chunks only: a prompt's shorter last chunk would build cuDNN plans for its own shapes in
        # every request (plans are per shape), and a one-token chunk is no shape cuDNN takes
        if self.cudnn_prefill and b - a == self.chunk and not self.model.window_of(l) and not self.prefill_window:
            try:
                return causal_chunk_cudnn(q, k_all[:b], v_all[:b], a, self.model.scale)
            except (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError)):
                raise
            except RuntimeError as e:  # a cuDNN that refuses these heads or this device: FlashAttention from now on
                log.warning("cuDNN prefill attention unavailable (%s): FlashAttention instead", str(e).splitlines()[0])
                self.cudnn_prefill = False
        lo, mask = self._prefill_mask(l, a, b)
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_all[lo:b].transpose(0, 1)[None],
                                              v_all[lo:b].transpose(0, 1)[None], attn_mask=mask,
                                              scale=self.model.scale, enable_gqa=True)

    def _prefill_mask(self, l: int, a: int, b: int):
        """(first key, mask) of prompt chunk [a, b) in layer l: causal over every earlier key; in a
        sliding-window layer each query sees its own key and the window - 1 before it (an exact band, as
        transformers masks it); the benchmarks' local prefill sees prefill_window keys back."""
        W = self.model.window_of(l)
        if W:
            lo = max(0, a - W + 1)
            qp = torch.arange(a, b, device=self.device)[:, None]
            kp = torch.arange(lo, b, device=self.device)[None]
            return lo, (kp <= qp) & (kp > qp - W)
        lo = max(0, a - self.prefill_window) if self.prefill_window else 0
        return lo, causal_lower_right(b - a, b - lo)

    def decode(self, token: int, pos: int, kv: SequenceKV, top_k: int, capture=None) -> torch.Tensor:
        """One token of one sequence -> logits (V,) float32 (decode_batch with a batch of one)."""
        cap = None if capture is None else (lambda l, o: capture(l, o[0]))
        return self.decode_batch([token], [pos], [kv], [top_k], cap)[0]

    @torch.inference_mode()
    def decode_batch(self, tokens: list[int], positions: list[int], kvs: list[SequenceKV], top_ks: list[int],
                     capture=None, slots: list[int] | None = None) -> torch.Tensor:
        """One decode step of B sequences: token b at position positions[b] over kvs[b] -> logits (B, V)
        float32. The weights are applied once for the batch; per layer, every sequence's device work is
        queued before the CPU lookups run, so the device works while the CPU searches, and the partial
        results merge in one op. `capture(l, o)`, if given, sees each layer's attention output (B, H, d).
        `slots`: the ring slots already taken for the tokens (kv.next_slot), if the caller took them.

        Sequences that share one static pool (the usual case) run as the pool's rows (`_decode_rows`, CUDA
        graphs where captured), `full` sequences alone as `_decode_full` (graphs of the whole step, attention
        included, where captured); any other mix of pools and `full` sequences runs `_decode_mixed`."""
        if slots is None:
            slots = [kv.next_slot(t) for kv, t in zip(kvs, tokens)]
        pool = kvs[0].pool
        if pool is not None and all(kv.pool is pool for kv in kvs):
            return self._decode_rows(pool, tokens, positions, kvs, top_ks, slots, capture)
        if all(kv.pool is None for kv in kvs):
            return self._decode_full(tokens, positions, kvs, slots, capture)
        return self._decode_mixed(tokens, positions, kvs, top_ks, slots, capture)

    # ------------------------------------------------------------------ one pool: a step over its rows
    def _decode_rows(self, pool: StaticPool, tokens, positions, kvs, top_ks, slots, capture) -> torch.Tensor:
        """The step over rows [0, Rc) of the pool, each sequence at its own row: no gather or scatter, and a
        fixed shape per Rc, which CUDA graphs capture (`capture_graphs`). Rows not in the batch are padding:
        they write to the pool's unused slot and their results are dropped."""
        graphs = self._graphs.get(id(pool)) if capture is None and self.use_graphs else None
        Rc = pool.rows if graphs is None else next(r for r in sorted(graphs) if r >= pool.rows)
        io = self._graph_io[id(pool)] if graphs is not None else self._eager_io(max(Rc, pool.k.shape[1]))
        rows = [kv.row for kv in kvs]
        io.stage(Rc, rows, tokens, positions, slots, pool.trash)
        buf = io.buf
        lookups = _StepLookups(kvs, rows, top_ks, buf, Rc, self.model, self.scratch)

        def on(point: str, l: int):
            if point == "query" and buf.q_ready is not None:
                buf.q_ready.record()
            elif point == "lookup":
                self._wait_for_queries(buf)
                lookups(l)

        if graphs is not None:
            for point, l, graph in graphs[Rc][lookups.any]:
                graph.replay()
                on(point, l)
        else:
            cap = None if capture is None else (lambda l, o: capture(l, o[rows]))
            with self._decode_backends():
                for point, l in self._rows_step(pool, io, Rc, lookups.any, cap):
                    on(point, l)
        io.step_done()
        return io.logits[rows]

    def _rows_step(self, pool: StaticPool, io: "_RowIO", Rc: int, cpu: bool, capture=None):
        """The device work of a step over pool rows [0, Rc), as a generator that yields (point, layer) where
        the host takes part: "query" once the layer's queries are queued for the host, "lookup" once the
        static attention is queued and the CPU part is due. Run as is (eager), or captured into one CUDA
        graph per stretch between two yields."""
        m, s, buf = self.model, self.model.shape, io.buf
        tok, pos, slot, rows = io.ints[0, :Rc], io.ints[1, :Rc], io.ints[2, :Rc], io.arange[:Rc]
        h = m.embed_tokens(tok)
        rope = m.rope(pos)
        windowed = None
        if s.sliding_window:  # slot positions matter to sliding-window layers only
            pool.pos[rows, slot] = pos
            windowed = _windowed_bias(pool.bias[:Rc], pool.pos[:Rc], pos, s.sliding_window)
        for l in range(s.n_layers):
            q, k, v = m.qkv(l, h, rope)
            pool.k[l, rows, :, slot] = k.float()
            pool.v[l, rows, :, slot] = v.float()
            qf = q.float()
            lookup = cpu and not m.window_of(l)  # a sliding-window layer has no keys off the device
            if lookup:
                buf.q_host[:Rc].copy_(qf, non_blocking=True)
                yield "query", l
            bias = windowed if m.window_of(l) else pool.bias[:Rc]
            o, mx, sm = self._attend(qf, pool.k[l, :Rc], pool.v[l, :Rc], bias, m.scale)
            if lookup:
                yield "lookup", l
                buf.o_dev[:Rc].copy_(buf.o_host[:Rc], non_blocking=True)
                buf.ms_dev[:Rc].copy_(buf.ms_host[:Rc], non_blocking=True)
                o = self._merge(o, mx, sm, buf.o_dev[:Rc], buf.ms_dev[:Rc, 0], buf.ms_dev[:Rc, 1])
            o = o.to(q.dtype)
            if capture is not None:
                capture(l, o)
            m.finish_layer(l, h, o)
        io.logits[:Rc] = m.logits(h)

    def _eager_io(self, size: int) -> "_RowIO":
        """The eager steps' buffers (one set for both paths, grown as needed: steps never overlap)."""
        if self._io is None or self._io.size < size:  # by doubling: a batch that grows by one reallocates rarely
            self._io = _RowIO(max(size, 2 * self._io.size if self._io else 0), self.model, self.device)
        return self._io

    def capture_graphs(self, pool: StaticPool, sizes: list[int]):
        """Capture the decode step over the fixed pool's rows as CUDA graphs, for each batch size in `sizes`
        (a batch runs in the smallest one that holds its rows), with and without a CPU part: one graph for
        a step without, one per stretch between the host's points for a step with. The graphs share one
        memory pool (they never run at once) and read and write only the pool and their _RowIO."""
        assert pool.fixed and self.device.type == "cuda"
        io = self._graph_io[id(pool)] = _RowIO(pool.k.shape[1], self.model, self.device)
        graphs, mem = {}, torch.cuda.graph_pool_handle()
        with torch.inference_mode(), self._decode_backends():
            io.ints[:] = 0
            io.ints[2] = pool.trash  # padding everywhere: the warm-up writes to no request's slots
            io.buf.o_host.zero_()
            io.buf.ms_host[:, 0], io.buf.ms_host[:, 1] = float("-inf"), 0.0
            for Rc in sorted(sizes, reverse=True):
                graphs[Rc] = {}
                for cpu in (False, True):
                    for _ in self._rows_step(pool, io, Rc, cpu):  # warm-up: workspaces, lazy inits
                        pass
                    torch.cuda.synchronize(self.device)
                    graphs[Rc][cpu] = self._capture(self._rows_step(pool, io, Rc, cpu), mem)
        torch.cuda.synchronize(self.device)
        self._graphs[id(pool)] = graphs
        self._graph_mem = mem

    @torch.inference_mode()
    def warm_up_full(self):
        """Build the fused `full` attention's kernels now, on a step of padding rows, not in the first request;
        if they fail to build here (no room for their tiles, say), `full` decodes eagerly with SDPA instead."""
        if not self._fused_full:
            return
        io = _RowIO(1, self.model, self.device)
        io.ints.zero_()
        io.full.stage(1, [], [])  # padding: the step writes to no request's buffers
        try:
            for _ in self._full_step(io, 1):
                pass
            torch.cuda.synchronize(self.device)
        except Exception:
            log.exception("the fused full-attention kernels failed: full mode decodes eagerly with SDPA")
            self._fused_full = False

    def capture_full_graphs(self, sizes: list[int], layers: int = FULL_GRAPH_LAYERS):
        """Capture the `full` step (`_full_step`, the fused attention: `warm_up_full` first) for each batch size
        in `sizes` as CUDA graphs of `layers` layers each, in the memory pool of the row graphs (`capture_graphs`
        first) if there is one. Without the fused attention, `full` decodes eagerly with SDPA."""
        assert self.device.type == "cuda"
        if not self._fused_full:
            return
        io = _RowIO(max(sizes), self.model, self.device)
        mem = self._graph_mem or torch.cuda.graph_pool_handle()
        graphs = {}
        with torch.inference_mode():
            io.ints.zero_()
            for Rc in sorted(sizes, reverse=True):
                io.full.stage(Rc, [], [])  # padding everywhere: the warm-up writes to no request's buffers
                for _ in self._full_step(io, Rc):  # warm-up: workspaces, lazy inits
                    pass
                torch.cuda.synchronize(self.device)
                step = ((None, l) for l in self._full_step(io, Rc) if l % layers == layers - 1)  # a graph ends
                graphs[Rc] = [g for _, _, g in self._capture(step, mem)]
        torch.cuda.synchronize(self.device)
        self._full_io, self._full_graphs = io, graphs  # only once every size is captured

    @staticmethod
    def _capture(step, mem) -> list[tuple[str | None, int, torch.cuda.CUDAGraph]]:
        """One graph per stretch of the generator `step` -> [(the point it ends at, layer, graph)]."""
        out, done = [], False
        while not done:
            g = torch.cuda.CUDAGraph()
            point, l = None, -1
            with torch.cuda.graph(g, pool=mem):
                try:
                    point, l = next(step)
                except StopIteration:
                    done = True
            out.append((point, l, g))
        return out

    # ------------------------------------------------------------------ `full` sequences alone
    def _decode_full(self, tokens, positions, kvs, slots, capture) -> torch.Tensor:
        """A step of `full` sequences. On CUDA, each layer's attention is engine/attention_cuda.py's kernels,
        which find each sequence's buffers and length in a device table staged here: the whole step then replays
        from CUDA graphs where captured (`capture_full_graphs`). Elsewhere (CPU, or kernels that did not build)
        the host writes each sequence's K/V and attends over its buffer with SDPA, one call per sequence and
        layer, and the step runs eagerly."""
        B = len(kvs)
        fused = self._fused_full
        graphs = self._full_graphs if fused and capture is None and self.use_graphs else None
        Rc = next((r for r in sorted(graphs or ()) if r >= B), None)
        if Rc is None:  # eager, or more sequences than any captured size
            graphs, Rc = None, B
        io = self._full_io if graphs is not None else self._eager_io(B)
        io.stage(Rc, slice(0, B), tokens, positions)
        cap = None if capture is None else (lambda l, o: capture(l, o[:B].clone()))  # io.o is every layer's
        if fused:
            io.full.stage(Rc, kvs, slots)
            if graphs is not None:
                for graph in graphs[Rc]:
                    graph.replay()
            else:
                for _ in self._full_step(io, Rc, cap):
                    pass
        else:
            def attend(l: int, q, k, v):
                for b, kv in enumerate(kvs):
                    kv.write(l, slots[b], k[b], v[b])
                    io.o[b] = kv.attend_full(l, q[b])

            with self._decode_backends():
                for _ in self._full_step(io, Rc, cap, attend):
                    pass
        io.step_done()
        return io.logits[:B].clone()  # the buffer is the next step's

    def _full_step(self, io: "_RowIO", Rc: int, capture=None, attend=None):
        """The device work of a `full` step over io rows [0, Rc): per layer, q/k/v, then attention into io.o
        (`attend(l, q, k, v)`; by default the fused kernels over io.full's tables), then the rest of the layer.
        A generator that yields each layer once done: graphs of several layers are captured between yields."""
        m = self.model
        h = m.embed_tokens(io.ints[0, :Rc])
        rope = m.rope(io.ints[1, :Rc])
        for l in range(m.shape.n_layers):
            q, k, v = m.qkv(l, h, rope)
            if attend is None:
                f = io.full
                attention_cuda.decode_attention(q, k, v, f.pad_k, f.table[l, :Rc], f.parts, io.o[:Rc], m.scale)
            else:
                attend(l, q, k, v)
            if capture is not None:
                capture(l, io.o)
            m.finish_layer(l, h, io.o[:Rc])
            yield l
        io.logits[:Rc] = m.logits(h)

    # ------------------------------------------------------------------ any mix: pools and `full`
    def _decode_mixed(self, tokens, positions, kvs, top_ks, slots, capture) -> torch.Tensor:
        """The general step: each pool's sequences are gathered from and scattered back to their rows,
        `full` sequences attend over their own buffers."""
        m, s = self.model, self.model.shape
        B, dev = len(kvs), self.device
        io = self._eager_io(B)
        io.wait_last_step()
        buf = io.buf
        groups, full = _group(kvs)
        ints = [*tokens, *positions]
        for pool, idx in groups:
            ints += [*idx, *(kvs[b].row for b in idx), *(slots[b] for b in idx)]
        ints = torch.tensor(ints, dtype=torch.long).to(dev, non_blocking=True)
        h = m.embed_tokens(ints[:B])
        rope = m.rope(ints[B: 2 * B])
        at, gidx = 2 * B, []
        windowed = []  # per group: its rows' bias in a sliding-window layer
        for pool, idx in groups:  # (batch indices, pool rows, slots) of each group on the device
            n = len(idx)
            bi, rows, sl = ints[at: at + n], ints[at + n: at + 2 * n], ints[at + 2 * n: at + 3 * n]
            gidx.append((bi, rows, sl))
            at += 3 * n
            windowed.append(None)
            if s.sliding_window:  # slot positions matter to sliding-window layers only
                pool.pos[rows, sl] = ints[B: 2 * B][bi]
                p = torch.full((pool.rows,), NO_POS, dtype=torch.long, device=dev)
                p[rows] = ints[B: 2 * B][bi]
                windowed[-1] = _windowed_bias(pool.bias[: pool.rows], pool.pos[: pool.rows], p, s.sliding_window)
        lookups = _StepLookups(kvs, list(range(B)), top_ks, buf, B, m, self.scratch)
        cpu = lookups.any
        with self._decode_backends():
            for l in range(s.n_layers):
                q, k, v = m.qkv(l, h, rope)
                for (pool, _), (bi, rows, sl) in zip(groups, gidx):
                    pool.k[l, rows, :, sl] = k[bi].float()
                    pool.v[l, rows, :, sl] = v[bi].float()
                for b in full:
                    kvs[b].write(l, slots[b], k[b], v[b])
                qf = q.float()
                lookup = cpu and not m.window_of(l)  # a sliding-window layer has no keys off the device
                if lookup:
                    buf.q_host[:B].copy_(qf, non_blocking=True)
                    if buf.q_ready is not None:
                        buf.q_ready.record()
                o = torch.empty_like(q)
                static = []
                for (pool, _), (bi, rows, _), wb in zip(groups, gidx, windowed):  # queued on the device
                    qp = qf.new_zeros(pool.rows, *q.shape[1:])
                    qp[rows] = qf[bi]
                    part = self._attend(qp, pool.k[l, : pool.rows], pool.v[l, : pool.rows],
                                             wb if m.window_of(l) else pool.bias[: pool.rows], m.scale)
                    static.append(tuple(x[rows] for x in part))
                for b in full:
                    o[b] = kvs[b].attend_full(l, q[b])
                if lookup:
                    self._wait_for_queries(buf)
                    lookups(l)
                    buf.o_dev[:B].copy_(buf.o_host[:B], non_blocking=True)
                    buf.ms_dev[:B].copy_(buf.ms_host[:B], non_blocking=True)
                for (o_w, m_w, s_w), (bi, _, _) in zip(static, gidx):
                    if lookup:
                        o_w = self._merge(o_w, m_w, s_w, buf.o_dev[bi], buf.ms_dev[bi, 0],
                                                      buf.ms_dev[bi, 1])
                    o[bi] = o_w.to(q.dtype)
                if capture is not None:
                    capture(l, o)
                m.finish_layer(l, h, o)
        logits = m.logits(h)
        io.step_done()
        return logits

    def _wait_for_queries(self, buf: "_StepBuffers"):
        t = time.perf_counter()
        if buf.q_ready is not None:
            buf.q_ready.synchronize()
        self._wait_s += time.perf_counter() - t

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def take_wait_seconds(self) -> float:
        """Seconds the host waited for the device (each layer's query copy) since the last call."""
        secs, self._wait_s = self._wait_s, 0.0
        return secs


def causal_chunk_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: int, scale: float) -> torch.Tensor:
    """The queries q (c, H, d) at positions [a, a + c) over the keys k/v (a + c, G, d), causally -> (1, H, c, d).

    cuDNN's attention runs a long prefill's layer in 0.25 s where FlashAttention-2 takes 0.40 (H200, 128K,
    Llama-3-8B heads; bench/prefill_attention.py), but masks only square-causal: so the chunk attends to
    its own keys causally and to the earlier keys unmasked, two calls whose results merge by log-sum-exp."""
    def part(kk, vv, causal):  # -> (o, m = log-sum-exp, s = 1): a normalised partial result
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], None, True, 0.0, causal,
            False, scale=scale)[:2]
        lse = lse.reshape(o.shape[:-1]).float()
        return o.float(), lse, torch.ones_like(lse)

    own = part(k[a:], v[a:], True)
    if a == 0:
        return own[0].to(q.dtype)
    return merge_partial_attention(*part(k[:a], v[:a], False), *own).to(q.dtype)


class _PrefillHidden:
    """A prefill's hidden states (n, D), chunk by chunk: `load(l, i)` gives chunk i's rows on the device
    for layer l, which the layer updates in place, and `store(l, i)` is told when it is done.

    On the device (`on_host` False) the chunks are views of one tensor. Otherwise they live in pinned host
    memory and pass through a ring of chunk buffers: a side stream copies the next chunk in while the
    layer works on this one and copies each done chunk back, so the device holds a few chunks, not the
    prompt (8 GB in bf16 at 1M tokens of an 8B model). The host memory is pinned by registering it, not
    taken from torch's pinned cache, which would keep it after the prefill."""

    SLOTS = 3  # in flight: the chunk being copied in, the one being worked on, the one being copied back

    def __init__(self, model: Transformer, ids: list[int], chunk: int, on_host: bool):
        dev = model.device
        self.chunk, self.n, self.streamed, self.pinned = chunk, len(ids), on_host, False
        self.chunks = -(-self.n // chunk)
        self.total = model.shape.n_layers * self.chunks  # chunks over all layers
        idx = torch.tensor(ids, device=dev)
        if not on_host:
            self.h, self.stream = model.embed_tokens(idx), None
            return
        self.h = torch.empty(self.n, model.shape.hidden_size, dtype=model.dtype)
        # portable (flag 1): pinned for every device, whichever is current; failing that, pageable copies
        self.pinned = dev.type == "cuda" and int(torch.cuda.cudart().cudaHostRegister(
            self.h.data_ptr(), self.h.nbytes, 1)) == 0
        try:
            for a in range(0, self.n, chunk):
                self.h[a: a + chunk] = model.embed_tokens(idx[a: a + chunk]).cpu()
            self.bufs = [torch.empty(min(chunk, self.n), self.h.shape[1], dtype=model.dtype, device=dev)
                         for _ in range(self.SLOTS)]
        except BaseException:
            self.stream = None
            self.close()  # memory is never freed while registered
            raise
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        if self.stream is not None:
            for b in self.bufs:
                b.record_stream(self.stream)  # freed early (a closed prefill): not reused while it copies
        self.ready: dict[int, torch.cuda.Event | None] = {}  # chunk j (over all layers) -> copied in
        self.issued = 0  # chunks j < issued are copied in, or on their way

    def _rows(self, j: int) -> tuple[int, int, torch.Tensor]:
        a = (j % self.chunks) * self.chunk
        b = min(self.n, a + self.chunk)
        return a, b, self.bufs[j % self.SLOTS][: b - a]

    def _copy_in(self, j: int):
        a, b, buf = self._rows(j)
        if self.stream is None:
            buf.copy_(self.h[a:b])
            self.ready[j] = None
            return
        with torch.cuda.stream(self.stream):  # after chunk j - SLOTS's copy back, queued earlier on this stream
            buf.copy_(self.h[a:b], non_blocking=True)
            self.ready[j] = torch.cuda.Event()
            self.ready[j].record()

    def load(self, l: int, i: int) -> torch.Tensor:
        if not self.streamed:
            return self.h[i * self.chunk: (i + 1) * self.chunk]
        j = l * self.chunks + i
        # this chunk and the next; with one chunk the next is this one in the next layer, not yet stored
        while self.issued <= min(j + (self.chunks > 1), self.total - 1):
            self._copy_in(self.issued)
            self.issued += 1
        ev = self.ready.pop(j)
        if ev is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(ev)
        return self._rows(j)[2]

    def store(self, l: int, i: int):
        if not self.streamed:
            return
        a, b, buf = self._rows(l * self.chunks + i)
        if self.stream is None:
            self.h[a:b] = buf
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the layer's work on it is queued
        with torch.cuda.stream(self.stream):
            self.h[a:b].copy_(buf, non_blocking=True)

    def last(self) -> torch.Tensor:
        """The last position's hidden state, on the device (after the last layer)."""
        if not self.streamed:
            return self.h[-1]
        if self.stream is not None:
            self.stream.synchronize()
        return self.h[-1].to(self.bufs[0].device)

    def close(self):
        """The copies are over before the host memory goes."""
        if self.stream is not None:
            self.stream.synchronize()
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.h.data_ptr())
            self.pinned = False


class _HostToDevice:
    """Copies large host tensors (a cached document's stored K/V) to the device through two small pinned
    buffers in turn: the copy into one (torch's CPU threads) overlaps the DMA out of the other, where a
    copy from pageable memory runs at a fraction of the bus (H200, 128K tokens bf16: 2.2 s for 32 layers'
    K and V). Fixed buffers: no pinned allocation in a request."""

    CHUNK = 64 * 2**20  # bytes per buffer

    def __init__(self, device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        self.bufs = [torch.empty(self.CHUNK if pin else 0, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.i = 0

    def __call__(self, src: torch.Tensor, out: torch.Tensor, unpack=None):
        """src (G, m, row) on the host -> out (m, G, d) on the device (in out's dtype); unpack(rows): their
        values (a compact store's rows are unpacked on the device, after the copy)."""
        unpack = unpack or (lambda x: x)
        if self.device.type != "cuda":
            out.copy_(unpack(src).transpose(0, 1))
            return
        G, m, d = src.shape
        step = max(1, self.CHUNK // (G * d * src.element_size()))
        for a in range(0, m, step):
            b = min(m, a + step)
            i, self.i = self.i, self.i ^ 1
            if self.done[i] is not None:
                self.done[i].synchronize()  # its last DMA is over
            stage = self.bufs[i][: G * (b - a) * d * src.element_size()].view(src.dtype).view(G, b - a, d)
            stage.copy_(src[:, a:b])
            out[a:b] = unpack(stage.to(self.device, non_blocking=True)).transpose(0, 1)
            self.done[i] = torch.cuda.Event()
            self.done[i].record()


class _DeviceToHost:
    """A prefill layer's K/V into host memory (the CPU stores, a document-cache entry), off the engine thread:
    a thread of its own copies them on a stream of its own once the layer's event has passed (the next layers
    run meanwhile), through two pinned buffers in turn, the DMA into one overlapping the CPU's copy out of the
    other, where a copy straight into pageable memory runs at a fraction of the bus. Fixed buffers."""

    CHUNK = 64 * 2**20  # bytes per buffer

    def __init__(self, device: torch.device):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rattn-offload")
        self.stream = torch.cuda.Stream(device)
        self.bufs = [torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]

    def submit(self, dst_k: torch.Tensor, dst_v: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, pack,
               ready: torch.cuda.Event) -> Future:
        """`write_rows(dst_k, dst_v, k, v, pack)` (k/v on the device), once `ready` has passed."""
        return self.pool.submit(self._copy, (dst_k, dst_v), k, v, pack, ready)

    @torch.inference_mode()  # (the prefill's tensors, a document entry's among them, are inference tensors)
    def _copy(self, rows, k: torch.Tensor, v: torch.Tensor, pack, ready: torch.cuda.Event):
        last = None  # (event, staged rows, their place on the host): the DMA before this one

        def finish(done):
            done[0].synchronize()
            done[2].copy_(done[1])

        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            i = 0
            for src, dst in zip((k, v), rows):
                if dst is None:
                    continue
                G, m, row = dst.shape
                step = max(1, self.CHUNK // (G * row * dst.element_size()))
                for a in range(0, m, step):
                    b = min(m, a + step)
                    # the CPU copy out of this buffer two pieces ago is done (finish, below, in this thread)
                    stage = self.bufs[i][: G * (b - a) * row * dst.element_size()].view(dst.dtype).view(G, b - a, row)
                    stage.copy_(pack(src[:, a:b]), non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                    if last is not None:
                        finish(last)
                    last, i = (ev, stage, dst[:, a:b]), i ^ 1
            if last is not None:
                finish(last)


class _StepBuffers:
    """The host<->device buffers of a decode step's CPU lookups, for up to `size` sequences: pinned on
    CUDA (asynchronous copies), allocated once and grown, never per step."""

    def __init__(self, size: int, H: int, d: int, device: torch.device):
        pin = device.type == "cuda"
        self.size = size
        self.q_host = torch.empty(size, H, d, dtype=torch.float32, pin_memory=pin)
        self.o_host = torch.zeros(size, H, d, dtype=torch.float32, pin_memory=pin)
        self.ms_host = torch.empty(size, 2, H, dtype=torch.float32, pin_memory=pin)
        self.o_dev = torch.empty(size, H, d, dtype=torch.float32, device=device)
        self.ms_dev = torch.empty(size, 2, H, dtype=torch.float32, device=device)
        self.q_ready = torch.cuda.Event() if pin else None
        # numpy views, made once: the per-layer calls then create no objects
        self.q_np, self.o_np, self.ms_np = self.q_host.numpy(), self.o_host.numpy(), self.ms_host.numpy()


class _StepLookups:
    """A step's CPU part, called once per layer: one native call for the requests whose stores are flat or
    graph (index.attend_batch), one call each for hnswlib's. Request i reads and writes row rows[i] of the
    step buffers; of their first n_rows rows, those without CPU keys hold an empty part."""

    def __init__(self, kvs: list[SequenceKV], rows: list[int], top_ks: list[int], buf: "_StepBuffers",
                 n_rows: int, model: Transformer, scratch: BatchScratch):
        self.buf, self.G, self.scale, self.scratch = buf, model.shape.n_kv_heads, model.scale, scratch
        # per step, not per layer: which sequences look up CPU keys (all layers have the same keys)
        cpu = [b for b, kv in enumerate(kvs) if kv.has_cpu_keys]
        self.any = bool(cpu)
        if cpu:
            buf.o_np[:n_rows], buf.ms_np[:n_rows, 0], buf.ms_np[:n_rows, 1] = 0.0, -np.inf, 0.0
        kvs, rows, top_ks = [kvs[b] for b in cpu], [rows[b] for b in cpu], [top_ks[b] for b in cpu]
        self.alone = [(kv, r, k) for kv, r, k in zip(kvs, rows, top_ks) if not kv.batchable]
        by_dtype: dict = {}  # one call per store dtype (one, unless requests chose different ones)
        for kv, r, k in zip(kvs, rows, top_ks):
            if kv.batchable:
                by_dtype.setdefault(kv.stores[0].dtype, []).append((kv, r, k))
        self.calls = [(dt, [kv for kv, _, _ in g], np.stack([kv.describe() for kv, _, _ in g]),
                       np.stack([kv.request(r, k) for kv, r, k in g])) for dt, g in by_dtype.items()]

    def __call__(self, l: int):
        buf = self.buf
        for dtype, kvs, desc, req in self.calls:
            for kv in kvs:
                kv.wait_insert(l)
            t = time.perf_counter()
            attend_batch(desc, l, req, self.G, self.scale, buf.q_np, buf.o_np, buf.ms_np, dtype, self.scratch)
            t = time.perf_counter() - t
            for kv in kvs:
                kv.add_retrieval_seconds(t)
        for kv, r, k in self.alone:
            kv.lookup(l, buf.q_np[r], k, buf.o_np[r], buf.ms_np[r, 0], buf.ms_np[r, 1])


class _RowIO:
    """A row step's inputs and outputs for up to `size` rows: tokens, positions and slots (host staging,
    pinned on CUDA, and device), the lookups' buffers, a `full` step's tables and attention output, and the
    logits. Fixed addresses: graphs read them."""

    def __init__(self, size: int, model: Transformer, device: torch.device):
        pin, shape = device.type == "cuda", model.shape
        self.size, self.model, self.device = size, model, device
        self._full: _FullTables | None = None
        self.o = torch.zeros(size, shape.n_heads, shape.head_dim, dtype=model.dtype, device=device)
        self.ints_host = torch.zeros(3, size, dtype=torch.long, pin_memory=pin)
        self.ints = torch.zeros(3, size, dtype=torch.long, device=device)
        self.arange = torch.arange(size, device=device)
        self.buf = _StepBuffers(size, shape.n_heads, shape.head_dim, device)
        self.logits = torch.empty(size, shape.vocab_size, dtype=torch.float32, device=device)
        self.done = torch.cuda.Event() if pin else None  # recorded after each step

    def stage(self, Rc: int, rows, tokens, positions, slots=None, pad_slot: int = 0):
        """A step's tokens, positions and ring slots at `rows` of the device's ints, once the last step's
        copy out of the host buffer is complete; the other rows of [0, Rc) are padding (token 0 at position 0,
        writing to pad_slot)."""
        self.wait_last_step()
        ints = self.ints_host.numpy()
        ints[0, :Rc], ints[1, :Rc], ints[2, :Rc] = 0, 0, pad_slot
        ints[0, rows], ints[1, rows] = tokens, positions
        if slots is not None:
            ints[2, rows] = slots
        self.ints.copy_(self.ints_host, non_blocking=True)

    @property
    def full(self) -> "_FullTables":
        """The fused `full` step's tables (made on first use: pool steps have none)."""
        if self._full is None:
            self._full = _FullTables(self.size, self.model, self.device)
        return self._full

    def wait_last_step(self):
        """Before a step writes the host buffers: the last step's copies out of them are complete."""
        if self.done is not None:
            self.done.synchronize()

    def step_done(self):
        if self.done is not None:
            self.done.record()


class _FullTables:
    """A fused `full` step's per-layer tables of its rows' buffers (engine/attention_cuda.py; host staging,
    pinned, and device), the attention's partial results, and the one-slot buffers of padding rows (pad_k is
    the tables' base)."""

    def __init__(self, size: int, model: Transformer, device: torch.device):
        s = model.shape
        self.host = torch.zeros(s.n_layers, size, attention_cuda.TABLE, dtype=torch.long,
                                pin_memory=device.type == "cuda")
        self.table = torch.zeros_like(self.host, device=device)
        self.parts = attention_cuda.Partials(size, s.n_kv_heads, s.n_heads, s.head_dim, device)
        self.pad_k, self.pad_v = (torch.zeros(s.n_kv_heads, 1, s.head_dim, dtype=model.dtype, device=device)
                                  for _ in range(2))
        self.pad_row = (0, *attention_cuda.offsets(self.pad_k, [self.pad_v]), 1, 0, 0)

    def stage(self, Rc: int, kvs: list[SequenceKV], slots: list[int]):
        """Rows [0, len(kvs)) are the sequences about to write their token at `slots`; the rest of [0, Rc) pad.
        The caller has waited for the last step (`_RowIO.stage`): its copy out of the host buffer is done."""
        t = self.host.numpy()
        for b, (kv, slot) in enumerate(zip(kvs, slots)):
            t[:, b] = kv.full_table(slot, self.pad_k)
        t[:, len(kvs):Rc] = self.pad_row
        self.table.copy_(self.host, non_blocking=True)


def _windowed_bias(bias: torch.Tensor, slot_pos: torch.Tensor, pos: torch.Tensor, W: int) -> torch.Tensor:
    """The static part's bias (R, n) for a sliding-window layer: a slot counts while its token is one of
    the last W up to the row's position pos (R,) (its own included)."""
    return torch.where(slot_pos > (pos[:, None] - W), bias, float("-inf"))


def _group(kvs: list[SequenceKV]):
    """-> [(pool, batch indices)] of the sequences with a static pool, and the batch indices of `full` ones."""
    groups: dict[int, tuple] = {}
    full = []
    for b, kv in enumerate(kvs):
        if kv.pool is None:
            full.append(b)
        else:
            groups.setdefault(id(kv.pool), (kv.pool, []))[1].append(b)
    return list(groups.values()), full
