"""The engine: one thread that runs every request, in steps (schedule -> run -> postprocess).

Requests wait in a bounded FIFO queue. Up to `max_num_seqs` of them run at once and share each decode
step; one waiting request at a time is prefilled, in slices of at most `prefill_slice` seconds between
the running requests' decode steps, so that their streams keep flowing during a long prefill.

    engine = Engine(EngineConfig())
    seq = engine.submit(Request(prompt_ids, SamplingParams(...)), on_output)   # StepOutput callbacks
    engine.abort(seq.request.request_id)

Every request ends in exactly one final StepOutput (finish_reason stop | length | abort | error),
after which its KV stores and indexes are gone. Nothing a request does ends the engine thread: a
failing request or output callback ends that request only. Should the thread end anyway, `health()`
says so, every waiting request fails with an error, and new ones are refused.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from index import store_format, warm_up, warm_up_device

from .attention import AttentionConfig
from .detokenize import IncrementalDetokenizer
from .doc_cache import MIN_TOKENS, DocCache, DocEntry, fingerprint
from .heads import copy_scores
from .kv import SequenceKV, StaticPools, entry_bytes, host_bytes, static_slots, window_needed
from .logging_context import request_id
from .loader import EMBEDDED, load_model
from .model_runner import ModelRunner, PrefillStats
from .sampling import Sampler
from .scheduler import QueueFull, Scheduler
from .sequence import Request, Sequence, StepOutput

__all__ = ["Engine", "EngineConfig", "EngineUnavailable", "NoTokenizer", "QueueFull", "RequestTimes"]

log = logging.getLogger("rattn.engine")


class EngineUnavailable(RuntimeError):
    """The engine is shutting down or its thread has ended: it takes no new requests."""


class NoTokenizer(ValueError):
    """Text in or out where the model has no tokenizer (random weights of a shape)."""


@dataclass
class EngineConfig:
    model: str = EMBEDDED
    load_format: str = "auto"          # auto | dummy (random weights of a configs/models shape)
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    max_model_len: int | None = None   # default: the model's max_position_embeddings
    max_queue: int = 64                # waiting requests; more get QueueFull (HTTP 429)
    max_num_seqs: int = 8              # requests that share a decode step
    prefill_slice: float = 0.25        # seconds of prefill work at most between two decode steps
    cuda_graphs: bool = True           # CUDA: decode steps replay graphs captured at start (False: eager)
    compile: bool = True               # CUDA: torch.compile fuses the elementwise work at start (False: eager ops)
    cpu_kv_budget_gb: float | None = None  # host memory for the running requests' CPU stores (None: available)
    doc_cache_gb: float | None = None  # document cache, within cpu_kv_budget (None: a quarter of it; 0: off)
    build_threads: int = 0             # index builds in parallel on CUDA (0: one per core)
    cpu_threads: int = 0               # numba threads of the retrieval step (0: all cores)
    request_timeout: float = 0.0       # seconds from submit() to the last token (0: none)
    stall_timeout: float = 120.0       # health() fails when the engine thread shows no progress for this long
    seed: int = 0                      # dummy weights

    def __post_init__(self):
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_queue < 1 or self.max_num_seqs < 1:
            raise ValueError("max_queue and max_num_seqs must be >= 1")
        if self.prefill_slice <= 0:
            raise ValueError("prefill_slice must be > 0")
        if self.cpu_kv_budget_gb is not None and self.cpu_kv_budget_gb <= 0:
            raise ValueError("cpu_kv_budget_gb must be > 0")
        if self.doc_cache_gb is not None and self.doc_cache_gb < 0:
            raise ValueError("doc_cache_gb must be >= 0")
        if self.request_timeout < 0 or self.stall_timeout <= 0:
            raise ValueError("request_timeout must be >= 0 and stall_timeout > 0")


def _size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def default_host_budget() -> int:
    """Host memory available now (Linux: MemAvailable, and within the container's cgroup limit if it has
    one) less a margin of a tenth of it, 1 GiB at least, for everything else the server and the machine
    hold. Where neither can be read: no bound (and a warning to set --cpu-kv-budget)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:  # cgroup v2: a container's limit, less what it uses but its reclaimable page cache (as docker counts)
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.stat") as f:
                cache = next((int(line.split()[1]) for line in f if line.startswith("inactive_file ")), 0)
            left = int(limit) - int(open("/sys/fs/cgroup/memory.current").read()) + cache
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    if avail is None:
        log.warning("host memory available unknown: no bound on the CPU stores (set --cpu-kv-budget), and no "
                    "document cache unless --doc-cache-gb sets its size")
        return UNBOUNDED
    return max(0, avail - max(avail // 10, 2**30))


@dataclass
class RequestTimes:
    queue_s: float      # arrival -> prefill starts
    prefill_s: float    # prefill (index builds included) -> first token
    decode_s: float     # first token -> last


@dataclass
class DecodeStepStats:
    seconds: float          # the step, sampling excluded
    requests: int
    lookup_s_per_layer: float  # one layer's CPU lookups (one call for every request; 0: none)
    wait_s: float           # the host waiting for the device inside the step
    insert_s: float         # core-seconds of index insertions (background), counted when waited for


class EngineObserver(Protocol):
    def on_prefill(self, stats: PrefillStats) -> None: ...
    def on_decode_step(self, stats: DecodeStepStats) -> None: ...
    def on_request_done(self, times: RequestTimes) -> None: ...


UNBOUNDED = 2**62
PROGRESS_LOG_S = 5.0  # a long prefill logs its progress this often
PLAN_PREFILL_TOKENS = 131072  # cuDNN's prefill plans made at start up to here (~4 s on the H200); longer prompts
# plan their further chunks in their own prefill


class Engine:
    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None):
        self.config = config
        self.observer = observer
        self.device = torch.device(config.device)
        self.model, self.tokenizer = load_model(config.model, config.device, getattr(torch, config.dtype),
                                                config.load_format, config.seed)
        self.shape = self.model.shape
        W = self.shape.sliding_window
        if W and config.attention.window < W:  # the server's default window holds the model's (a request's may not)
            log.warning("attention window raised from %d to the model's sliding window, %d", config.attention.window, W)
            self.config = config = replace(config, attention=config.attention.override(window=W))
        self.max_model_len = config.max_model_len or self.shape.max_position_embeddings
        self.eos_ids = self._eos_ids()
        self.copy_scores = copy_scores(self.model)  # (L, H): heads that retrieval scans exactly
        self.runner = ModelRunner(self.model, config.build_threads)
        self.pools = StaticPools(self.shape, self.device)  # the running requests' static parts, batched
        if self.device.type == "cuda" and config.compile:
            t = time.perf_counter()
            if self.runner.compile():
                log.info("torch.compile: the model's fused kernels built in %.1f s", time.perf_counter() - t)
        if self.device.type == "cuda":
            self.runner.warm_up_full()  # Triton builds `full`'s kernels here (or they are off), graphs or not
        if self.device.type == "cuda" and config.cuda_graphs:
            self._capture_graphs()
        warm_up()  # the CPU kernels compile here, not inside the first request that offloads
        budget, doc = self._host_budgets()
        self.doc_cache = DocCache(doc) if doc else None
        self.scheduler = Scheduler(config.max_num_seqs, config.max_queue, budget, self.doc_cache,
                                   lambda seq: self._find_document(seq, take=False)[0])
        self._seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.dead: str | None = None        # why the engine thread ended, once it has
        self.progress_at = time.monotonic()  # the engine thread's heartbeat
        self.prefill_done = 0.0             # share of the current prefill's layers done (0 when none)
        self._planned = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rattn-engine", daemon=True)
        self._thread.start()
        self._planned.wait()

    def _capture_graphs(self):
        """A fixed static pool that holds every running request whose static part fits the default sink +
        window, and the decode step over it captured for batches of 1, 2, 4, ... max_num_seqs rows; and the
        step of `full` requests alone for the same sizes."""
        if "dynamic" in str(getattr(self.model.rotary, "rope_type", "")):  # its RoPE tables change with the length
            log.warning("dynamic RoPE: decoding without CUDA graphs")
            return
        S, C, _ = static_slots(self.config.attention, self.max_model_len)
        n = self.config.max_num_seqs
        pool = self.pools.fix(S + C, n)
        sizes = sorted({min(1 << i, n) for i in range(n.bit_length() + 1)})
        t = time.perf_counter()
        try:
            self.runner.capture_graphs(pool, sizes)
            log.info("decode step captured as CUDA graphs for batches of %s in %.1f s", sizes, time.perf_counter() - t)
        except Exception:  # the eager step serves the same pool
            log.exception("CUDA graph capture failed: decoding eagerly")
        try:
            self.runner.capture_full_graphs(sizes)
        except Exception:
            log.exception("CUDA graph capture of the full-attention step failed: full mode decodes eagerly")

    def _host_budgets(self) -> tuple[int, int]:
        """(bytes for the running requests' CPU stores and the document cache together, the most the cache
        may take of them): as configured, else what the machine has available, and a quarter of it."""
        c = self.config
        kv = int(c.cpu_kv_budget_gb * 2**30) if c.cpu_kv_budget_gb is not None else default_host_budget()
        if self.shape.sliding_layers:  # an entry keeps no K/V of a sliding-window layer past its window
            if c.doc_cache_gb:
                log.warning("the document cache does not serve models with sliding-window layers: it is off")
            doc = 0
        elif c.doc_cache_gb is not None:
            doc = int(c.doc_cache_gb * 2**30)
        else:
            doc = 0 if kv >= UNBOUNDED else kv // 4
        return kv, min(doc, kv)

    @property
    def cpu_kv_budget(self) -> int:
        """Bytes of host memory the running requests' CPU stores and the document cache may take together."""
        return self.scheduler.host_budget

    def tokens_that_fit(self, prompt_len: int, attention: AttentionConfig | None = None) -> int:
        """The most tokens a request with this prompt may ask to generate within the host budget (and the
        context); 0 if the prompt alone does not fit."""
        att = attention or self.config.attention
        lo, hi = 0, max(0, self.max_model_len - prompt_len)
        while lo < hi:  # host_bytes grows with the tokens asked for
            mid = (lo + hi + 1) // 2
            if host_bytes(self.shape, att, prompt_len, prompt_len + mid) <= self.cpu_kv_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ------------------------------------------------------------------ public API
    def check_window(self, attention: AttentionConfig, total_len: int):
        """A sliding-window layer attends from the ring of the static part: it must hold the model's window
        (or the whole request, prompt and new tokens, where that is shorter)."""
        W = window_needed(self.shape, attention.mode, total_len)
        if attention.window < W:
            raise ValueError(f"this model's sliding-window layers attend to the last {self.shape.sliding_window} "
                             f"tokens: this request's attention window must be at least {W} (it is "
                             f"{attention.window})")

    def admit_host_bytes(self, prompt_len: int, max_tokens: int, attention: AttentionConfig) -> int:
        """The host memory a request may need (kv.host_bytes); ValueError, giving it and the budget, if it
        can never fit within --cpu-kv-budget."""
        need = host_bytes(self.shape, attention, prompt_len, prompt_len + max_tokens)
        if need > self.cpu_kv_budget:
            raise ValueError(f"this request may need {_size(need)} of host memory for its offloaded K/V and index "
                             f"({prompt_len} prompt tokens + {max_tokens} to generate, {attention.mode} mode, "
                             f"{store_format(attention.store_kind, attention.index.dtype)} store), more than the server's budget of "
                             f"{_size(self.cpu_kv_budget)} (--cpu-kv-budget); a shorter prompt or fewer tokens to "
                             f"generate would fit")
        return need

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok().encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> list[int]:
        if not self._tok().chat_template:
            raise ValueError("this model has no chat template (a base model): send a prompt to /v1/completions")
        text = self._tok().apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self._tok().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self._tok().decode(ids)

    def token_strs(self, ids: list[int]) -> list[str]:
        return self._tok().convert_ids_to_tokens(ids)

    def _tok(self):
        if self.tokenizer is None:
            raise NoTokenizer("this model has no tokenizer (--load-format dummy): send token ids, not text")
        return self.tokenizer

    def submit(self, request: Request, on_output: Callable[[StepOutput], None]) -> Sequence:
        n, mt = len(request.prompt_ids), request.sampling.max_tokens
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + mt > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                             f"has {n} prompt tokens and asks for {mt} more ({n + mt} in all)")
        if max(request.prompt_ids) >= self.shape.vocab_size or min(request.prompt_ids) < 0:
            raise ValueError("prompt token ids out of the vocabulary")
        seq = Sequence(request, request.attention or self.config.attention, on_output)
        self.check_window(seq.attention, n + mt)
        seq.host_bytes = self.admit_host_bytes(n, mt, seq.attention)
        if self.config.request_timeout:
            seq.deadline = seq.arrival + self.config.request_timeout
        with self._lock:
            if self.dead or self._stopping.is_set():
                raise EngineUnavailable(f"the engine is not running ({self.dead or 'shutting down'})")
            if request.request_id in self._seqs:
                raise ValueError(f"duplicate request id {request.request_id}")
            self.scheduler.add(seq)
            self._seqs[request.request_id] = seq
        return seq

    def abort(self, request_id: str):
        seq = self._seqs.get(request_id)
        if seq is not None:
            seq.aborted.set()

    def abort_all(self):
        with self._lock:
            for seq in self._seqs.values():
                seq.aborted.set()

    def stream(self, request: Request) -> Iterator[StepOutput]:
        """Blocking iterator over one request's outputs, for the CLI, benchmarks and tests."""
        q: queue.Queue[StepOutput] = queue.Queue()
        self.submit(request, q.put)
        while True:
            out = q.get()
            yield out
            if out.finish_reason is not None:
                return

    def generate(self, request: Request) -> list[StepOutput]:
        return list(self.stream(request))

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def cpu_kv_bytes(self) -> int:
        return sum(kv.cpu_bytes() for kv in (s.kv for s in self.scheduler.active()) if kv is not None)

    def kv_of(self, request_id: str) -> SequenceKV | None:
        seq = self._seqs.get(request_id)
        return seq.kv if seq is not None else None

    def health(self) -> str | None:
        """None while the engine serves; otherwise why it does not (/health answers 503 with it)."""
        if self.dead or not self._thread.is_alive():
            return f"the engine thread has ended ({self.dead or 'unknown cause'})"
        if self._stopping.is_set():
            return "shutting down"
        idle = time.monotonic() - self.progress_at
        if idle > self.config.stall_timeout:
            return f"the engine has made no progress for {idle:.0f} s"
        return None

    def shutdown(self, timeout: float = 10.0):
        """Abort every request (each gets its final output), stop the engine thread, free everything."""
        self._stopping.set()
        self.abort_all()
        self._thread.join(timeout=timeout)
        self.runner.pool.shutdown(wait=False, cancel_futures=True)
        self.runner.insert_pool.shutdown(wait=False, cancel_futures=True)
        if self.runner._to_host is not None:
            self.runner._to_host.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ engine thread
    def _eos_ids(self) -> set[int]:
        ids = set()
        eos = getattr(self.model.hf_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def plan_prefill(self):
        """cuDNN's prefill attention plans for prompts up to PLAN_PREFILL_TOKENS, in the calling thread: its
        plan cache is per thread, so this runs where the prefills run (the engine thread, at start). And the
        graph input's Triton kernels, compiled before the first long prompt needs them."""
        t = time.perf_counter()
        if n := self.runner.plan_prefill_attention(min(self.max_model_len, PLAN_PREFILL_TOKENS)):
            log.info("cuDNN prefill attention planned for prompts up to %d tokens in %.1f s", n, time.perf_counter() - t)
        t = time.perf_counter()
        try:
            if self.device.type == "cuda" and warm_up_device(self.device, self.model.dtype, self.shape.head_dim):
                log.info("the graph input's kernels compiled in %.1f s", time.perf_counter() - t)
        except Exception:  # the prefills compile them, or take the torch path
            log.exception("the graph input's warm-up failed")

    def _loop(self):
        try:
            try:  # the engine is not ready before this is done (its constructor waits), whatever happens here
                if self.config.cpu_threads:
                    import numba

                    numba.set_num_threads(self.config.cpu_threads)  # thread-local: set where the kernels run
                try:
                    self.plan_prefill()
                except Exception:  # the prefills plan for themselves
                    log.exception("cuDNN prefill planning failed")
            finally:
                self._planned.set()
            sched = self.scheduler
            while True:
                self.progress_at = time.monotonic()
                self._drop_ended_waiting()
                seq = sched.next_prefill()
                if seq is not None:
                    self._start(seq)
                if sched.prefilling is not None:
                    self._prefill_slice(sched.prefilling, self.config.prefill_slice if sched.running else None)
                if sched.running:
                    self._decode_step(list(sched.running))
                elif sched.prefilling is None:
                    if self._stopping.is_set() and sched.idle():
                        return
                    sched.wait_for_work(0.5)
        except BaseException as e:
            self.dead = f"{type(e).__name__}: {e}"
            log.critical("the engine thread ended: %s", self.dead, exc_info=True)
            raise
        finally:
            with self._lock:
                self.dead = self.dead or "shut down"
                left = list(self._seqs.values())
                self._seqs.clear()
            for seq in left:  # none may wait for an engine that is gone
                self._free(seq)
                finish = "abort" if seq.aborted.is_set() else "error"
                self._emit(seq, StepOutput(seq.request.request_id, None, "", None, finish,
                                           f"the engine is not running ({self.dead})", seq.num_prompt,
                                           len(seq.generated), error_status=503))

    def _emit(self, seq: Sequence, out: StepOutput):
        """Hand an output to the request's callback. A callback that raises (its client is gone) aborts
        that request; it never reaches the engine loop."""
        try:
            seq.on_output(out)
        except Exception:
            log.exception("request %s: output callback failed; aborting the request", seq.request.request_id)
            seq.aborted.set()

    def _stop_reason(self, seq: Sequence) -> str | None:
        if seq.aborted.is_set():
            return "abort"
        if seq.deadline is not None and time.monotonic() > seq.deadline:
            return "timeout"
        return None

    def _drop_ended_waiting(self):
        """Waiting requests that were aborted or ran out of time end now, not when their turn comes."""
        for seq in self.scheduler.take_waiting_if(self._stop_reason):
            self._end_early(seq)

    def _out(self, seq: Sequence, token, text, sample=None, finish=None, error=None) -> StepOutput:
        return StepOutput(seq.request.request_id, token, text, sample, finish, error, seq.num_prompt,
                          len(seq.generated), num_cached_tokens=seq.cached_tokens)

    def _end_early(self, seq: Sequence):
        """End a request that was aborted or is out of time. Out of time ends it as if it had reached its
        max_tokens (--request-timeout), with no token if it had none yet."""
        aborted = self._stop_reason(seq) == "abort"
        if not aborted and seq.first_token is None:
            log.info("request %s: --request-timeout (%g s) reached before its first token", seq.request.request_id,
                     self.config.request_timeout)
        self._finish(seq, self._out(seq, None, seq.detok.flush() if seq.detok else "",
                                    finish="abort" if aborted else "length"))

    def _fail(self, seq: Sequence, e: Exception):
        log.error("request %s failed", seq.request.request_id, exc_info=e)
        self._finish(seq, self._out(seq, None, "", finish="error", error=f"{type(e).__name__}: {e}"))

    def _free(self, seq: Sequence):
        if seq.prefill is not None:
            try:
                seq.prefill.close()  # cancels its queued index builds, waits for running ones
            except Exception:
                log.exception("request %s: closing its prefill failed", seq.request.request_id)
            seq.prefill = None
        if seq.kv is not None:
            seq.kv.free()
            seq.kv = None
        if seq.doc is not None:  # after the KV: nothing of the request reads the entry any more
            self.doc_cache.release(seq.doc)
            seq.doc = None
        if seq.doc_making is not None:  # ended before its entry was made
            self.doc_cache.unreserve(seq.doc_making[1])
            seq.doc_making = None

    def _finish(self, seq: Sequence, out: StepOutput):
        """The request's final output: its KV is freed first, then it leaves the engine."""
        self._free(seq)
        self.scheduler.remove(seq)
        with self._lock:
            self._seqs.pop(seq.request.request_id, None)
        self._emit(seq, out)
        if seq.first_token is not None:
            end = time.monotonic()
            self._observe("on_request_done", RequestTimes(seq.started - seq.arrival, seq.first_token - seq.started,
                                                          end - seq.first_token))

    def _observe(self, event: str, *args):
        """Tell the observer (metrics); its failure is logged, never a request's or the engine's."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, event)(*args)
        except Exception:
            log.exception("observer %s failed", event)

    # ------------------------------------------------------------------ prefill
    def _start(self, seq: Sequence):
        """Create the request's KV and its prefill (run later, in slices)."""
        sp = seq.request.sampling
        seq.started = self._prefill_logged = time.monotonic()
        if self._stop_reason(seq):
            self._end_early(seq)
            return
        try:
            hit, c = self._find_document(seq)
            seq.kv = SequenceKV(self.shape, seq.attention, seq.num_prompt + sp.max_tokens, self.device,
                                self.model.dtype, self.copy_scores, self.pools, prefix=(hit, c) if hit else None,
                                new_entry=seq.doc_making[0] if seq.doc_making else None)
            seq.prefill = self.runner.prefill_steps(seq.request.prompt_ids, [seq.kv])
            seq.sampler = Sampler(sp, self.shape.vocab_size, self.device)
            seq.detok = IncrementalDetokenizer(self.tokenizer, sp.stop) if self.tokenizer is not None else None
            seq.stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_ids)
        except Exception as e:
            self._fail(seq, e)

    def _find_document(self, seq: Sequence, take: bool = True) -> tuple[DocEntry | None, int]:
        """The document-cache entry whose prefix the prompt reuses and that prefix's length (a reference
        the request holds), or (None, 0): then, if the prompt is long enough and fits the cache, the
        request makes an entry of it. take=False: only which entry it would reuse."""
        ids, att = seq.request.prompt_ids, seq.attention
        key = fingerprint(att) if self.doc_cache is not None and len(ids) >= MIN_TOKENS else None
        if key is None:
            return None, 0
        if seq.doc_hashes is None:  # once: a request that waits for memory is looked up at every step
            seq.doc_hashes = DocCache.prompt_chain(key, ids)
        hit, c = self.doc_cache.lookup(key, ids, least=att.sink, take=take, hashes=seq.doc_hashes)
        if not take:
            return hit, c
        if hit is not None:
            seq.doc, seq.cached_tokens = hit, c
            return hit, c
        need = entry_bytes(self.shape, att, len(ids), self.model.dtype)
        if self.doc_cache.reserve(need, self.cpu_kv_budget - self.scheduler.requests_bytes()):
            seq.doc_making = (DocEntry(key, np.asarray(ids, np.int64)), need)
        return None, 0

    def _prefilled_document(self, seq: Sequence):
        """After the prefill: an entry it made joins the cache; and the keys it reads from an entry in the
        cache (made or found) are the cache's to count, no longer its own (admission)."""
        if seq.doc_making is not None:
            entry, reserved = seq.doc_making
            seq.doc_making = None  # insert gives the reservation back, made or not (or raising)
            if self.doc_cache.insert(entry, reserved):
                seq.doc = entry
            else:  # larger than reserved: the request keeps it alone, and counts it
                seq.host_bytes += entry.nbytes
        if seq.doc is not None and seq.kv.cached_n:
            n = seq.num_prompt - seq.kv.cached_n
            seq.host_bytes = host_bytes(self.shape, seq.attention, n, n + seq.request.sampling.max_tokens)

    def _prefill_slice(self, seq: Sequence, budget: float | None):
        """Advance the prefill by about `budget` seconds of work (None: to its end), checking between
        chunks whether the request was aborted or ran out of time. Once done, its first token is sampled
        and it joins the running set."""
        ctx = request_id.set(seq.request.request_id)  # this request's id on the engine's log lines
        try:
            L, t0 = self.shape.n_layers, time.monotonic()
            while True:
                self._drop_ended_waiting()  # a long prefill runs unsliced when nothing else runs
                if self._stop_reason(seq):
                    self._end_early(seq)
                    return
                try:
                    done = next(seq.prefill)
                except StopIteration as e:
                    logits, stats = e.value
                    break
                if budget is not None:  # the slice is device time: without this the host runs ahead, queueing
                    self.runner.sync()  # more prefill work than the budget in front of the next decode step
                now = self.progress_at = time.monotonic()
                self.prefill_done = done / L
                if now - self._prefill_logged >= PROGRESS_LOG_S:
                    self._prefill_logged = now
                    log.info("request %s: prefill %d/%d layers of %d tokens", seq.request.request_id, done, L,
                             seq.num_prompt)
                if budget is not None and now - t0 >= budget:
                    return
            seq.prefill = None
            if self.doc_cache is not None:
                self._prefilled_document(seq)
            self._observe("on_prefill", stats[0])
            self.scheduler.prefilled(seq)
            self._accept(seq, logits)
        except Exception as e:  # a failure ends this request, never the engine
            self._fail(seq, e)
        finally:
            if seq.prefill is None:  # done, ended or failed
                self.prefill_done = 0.0
            request_id.reset(ctx)

    # ------------------------------------------------------------------ decode
    def _decode_step(self, batch: list[Sequence]):
        """One decode step for every running request, then each one's sampling, stop rules and output."""
        slots, ready = [], []
        for seq in batch:
            try:
                if self._stop_reason(seq):  # a client gone frees its KV before the step
                    self._end_early(seq)
                    continue
                with torch.inference_mode():  # it writes the step's device buffers, made in inference mode
                    slots.append(seq.kv.next_slot(seq.generated[-1]))  # its own failure (a full buffer) is its own
                ready.append(seq)
            except Exception as e:
                self._fail(seq, e)
        batch = ready
        if not batch:
            return
        t = time.perf_counter()
        try:
            logits = self.runner.decode_batch([s.generated[-1] for s in batch],
                                              [s.num_prompt + len(s.generated) - 1 for s in batch],
                                              [s.kv for s in batch], [s.attention.top_k for s in batch], slots=slots)
        except Exception as e:  # a failure inside the step is shared by its requests; the engine goes on
            for seq in batch:
                self._fail(seq, e)
            return
        # the requests' lookups of a layer run in one call: each one's time is that call's
        self._observe("on_decode_step", DecodeStepStats(
            time.perf_counter() - t, len(batch), max(s.kv.take_retrieval_seconds() for s in batch),
            self.runner.take_wait_seconds(), sum(s.kv.take_insert_seconds() for s in batch)))
        for seq, row in zip(batch, logits):
            ctx = request_id.set(seq.request.request_id)
            try:
                self._accept(seq, row)
            except Exception as e:
                self._fail(seq, e)
            finally:
                request_id.reset(ctx)

    def _accept(self, seq: Sequence, logits: torch.Tensor):
        """Sample the request's next token from its logits (V,) and emit it, or end the request."""
        self.progress_at = time.monotonic()
        if self._stop_reason(seq):
            self._end_early(seq)
            return
        res = seq.sampler(logits)
        seq.first_token = seq.first_token or time.monotonic()
        seq.generated.append(res.token)
        detok = seq.detok
        if res.token in seq.stop_ids:
            self._finish(seq, self._out(seq, res.token, detok.flush() if detok else "", res, "stop"))
            return
        text, stopped = detok.add(res.token) if detok else ("", False)
        if stopped:
            self._finish(seq, self._out(seq, res.token, text, res, "stop"))
        elif len(seq.generated) == seq.request.sampling.max_tokens:
            self._finish(seq, self._out(seq, res.token, text + (detok.flush() if detok else ""), res, "length"))
        else:
            self._emit(seq, self._out(seq, res.token, text, res))
