"""Prefill of one sequence and decode steps of a batch of sequences, each over its SequenceKV.

Prefill runs the prompt through one layer at a time (projections and MLP chunked over tokens,
attention chunked over queries), places that layer's KV (static part on the device, the rest in its
CPU store) and queues the layer's index build on the build pool, so builds overlap later layers.
Only one layer's K/V and the hidden states are ever on the device at once.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Generator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .kv import SequenceKV
from .model import Transformer


DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class PrefillStats:
    tokens: int = 0
    compute_s: float = 0.0     # the layers' forward pass
    index_wait_s: float = 0.0  # waiting for index builds after the last layer
    build_s: float = 0.0       # index build time summed over layers (overlaps compute)
    offloaded: int = 0


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
        self.pool = (ThreadPoolExecutor(max_workers=build_threads or os.cpu_count(), thread_name_prefix="rattn-build")
                     if self.device.type == "cuda" else InlineExecutor())
        # decode on CUDA: SDPA's default picks cuDNN, which plans anew for every K/V length, i.e. every step
        # (H200, 128K, one layer: ~40 ms by default, 1.7 ms forced cuDNN, 0.18 ms flash; bench/attention_kernels.py)
        self._decode_backends = ((lambda: sdpa_kernel(DECODE_BACKENDS)) if self.device.type == "cuda"
                                 else contextlib.nullcontext)

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
        h = m.embed[torch.tensor(ids, device=self.device)]
        cos, sin = m.rope(torch.arange(N, device=self.device))
        sampled = []  # per kv: (rows on host, rows on device, gathered queries) for a graph build, else None
        for kv in kvs:
            kv.plan_prefill(ids)
            rows = kv.query_rows(N)
            sampled.append(None if rows is None else (
                rows, rows.to(self.device),
                torch.empty(len(rows), s.n_heads, s.head_dim, device=self.device, dtype=m.dtype)))
        attn = torch.empty(N, s.n_heads, s.head_dim, device=self.device, dtype=m.dtype)
        k_all = torch.empty(N, s.n_kv_heads, s.head_dim, device=self.device, dtype=m.dtype)
        v_all = torch.empty_like(k_all)
        for l in range(s.n_layers):
            for a in range(0, N, self.chunk):
                b = min(N, a + self.chunk)
                q, k, v = m.qkv(l, h[a:b], cos[a:b], sin[a:b])
                k_all[a:b], v_all[a:b] = k, v
                if capture is not None:
                    capture(l, a, q, k)
                for rows, rows_dev, q_rows in filter(None, sampled):
                    lo, hi = torch.searchsorted(rows, torch.tensor([a, b])).tolist()
                    q_rows[lo:hi] = q[rows_dev[lo:hi] - a]
                o = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], k_all[:b].transpose(0, 1)[None], v_all[:b].transpose(0, 1)[None],
                    attn_mask=causal_lower_right(b - a, b), enable_gqa=True)
                attn[a:b] = o[0].transpose(0, 1)
                yield l
            for kv, smp in zip(kvs, sampled):
                fut = kv.place_prefill(l, k_all, v_all, smp[2] if smp else None, self.pool)
                if fut is not None:
                    futures.append(fut)
            for a in range(0, N, self.chunk):
                m.finish_layer(l, h[a:a + self.chunk], attn[a:a + self.chunk])
                yield l if a + self.chunk < N else l + 1
        logits = m.logits(h[-1])
        t1 = time.perf_counter()
        pending = futures
        while pending:  # a failed build fails the request; the wait yields, so it keeps the heartbeat
            done, pending = wait(pending, timeout=0.2)
            for f in done:
                f.result()
            if pending:
                yield s.n_layers
        t2 = time.perf_counter()
        return logits, [PrefillStats(N, t1 - t0, t2 - t1, kv.build_seconds(), kv.offloaded_tokens()) for kv in kvs]

    def decode(self, token: int, pos: int, kv: SequenceKV, top_k: int, capture=None) -> torch.Tensor:
        """One token of one sequence -> logits (V,) float32 (decode_batch with a batch of one)."""
        cap = None if capture is None else (lambda l, o: capture(l, o[0]))
        return self.decode_batch([token], [pos], [kv], [top_k], cap)[0]

    @torch.inference_mode()
    def decode_batch(self, tokens: list[int], positions: list[int], kvs: list[SequenceKV], top_ks: list[int],
                     capture=None) -> torch.Tensor:
        """One decode step of B sequences: token b at position positions[b] over kvs[b] -> logits (B, V)
        float32. The weights are applied once for the batch; per layer, each sequence's static part is
        queued on the device before any CPU lookup runs, so the device works while the CPU searches.
        `capture(l, o)`, if given, sees each layer's attention output (B, H, d)."""
        m, s = self.model, self.model.shape
        B = len(kvs)
        ints = torch.tensor([*tokens, *positions], dtype=torch.long).to(self.device, non_blocking=True)
        h = m.embed[ints[:B]]
        cos, sin = m.rope(ints[B:])
        slots = [kv.next_slot(t) for kv, t in zip(kvs, tokens)]
        with self._decode_backends():
            for l in range(s.n_layers):
                q, k, v = m.qkv(l, h, cos, sin)
                for b, kv in enumerate(kvs):
                    kv.write(l, slots[b], k[b], v[b])
                parts = [kv.begin_attend(l, q[b]) for b, kv in enumerate(kvs)]
                o = torch.stack([kv.end_attend(l, p, t) for kv, p, t in zip(kvs, parts, top_ks)])
                if capture is not None:
                    capture(l, o)
                m.finish_layer(l, h, o)
        return m.logits(h)
