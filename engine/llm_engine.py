"""The engine: one thread that takes requests from a bounded FIFO queue and runs each to its end.

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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from index import warm_up

from .attention import AttentionConfig
from .detokenize import IncrementalDetokenizer
from .heads import copy_scores
from .kv import SequenceKV
from .logging_context import request_id
from .loader import EMBEDDED, load_model
from .model_runner import ModelRunner, PrefillStats
from .sampling import Sampler, SamplingParams
from .sequence import Request, Sequence, StepOutput

log = logging.getLogger("rattn.engine")


class QueueFull(RuntimeError):
    pass


class EngineUnavailable(RuntimeError):
    """The engine is shutting down or its thread has ended: it takes no new requests."""


class NoTokenizer(ValueError):
    """Text in or out where the model has no tokenizer (random weights of a shape)."""


class _Stop(Exception):
    """Ends a request's prefill early: the client left, or the request ran out of time."""


@dataclass
class EngineConfig:
    model: str = EMBEDDED
    load_format: str = "auto"          # auto | dummy (random weights of a configs/models shape)
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    max_model_len: int | None = None   # default: the model's max_position_embeddings
    max_queue: int = 64
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
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.request_timeout < 0 or self.stall_timeout <= 0:
            raise ValueError("request_timeout must be >= 0 and stall_timeout > 0")


@dataclass
class RequestTimes:
    queue_s: float      # arrival -> prefill starts
    prefill_s: float    # prefill (index builds included) -> first token
    decode_s: float     # first token -> last


class EngineObserver(Protocol):
    def on_prefill(self, stats: PrefillStats) -> None: ...
    def on_decode_step(self, seconds: float, retrieval_seconds_per_layer: float) -> None: ...
    def on_request_done(self, times: RequestTimes) -> None: ...


PROGRESS_LOG_S = 5.0  # a long prefill logs its progress this often


class Engine:
    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None):
        self.config = config
        self.observer = observer
        self.device = torch.device(config.device)
        self.model, self.tokenizer = load_model(config.model, config.device, getattr(torch, config.dtype),
                                                config.load_format, config.seed)
        self.shape = self.model.shape
        self.max_model_len = config.max_model_len or self.shape.max_position_embeddings
        self.eos_ids = self._eos_ids()
        self.copy_scores = copy_scores(self.model)  # (L, H): heads that retrieval scans exactly
        self.runner = ModelRunner(self.model, config.build_threads)
        warm_up()  # the CPU kernels compile here, not inside the first request that offloads
        self._queue: queue.Queue[Sequence] = queue.Queue(maxsize=config.max_queue)
        self._seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.dead: str | None = None        # why the engine thread ended, once it has
        self.progress_at = time.monotonic()  # the engine thread's heartbeat
        self.prefill_done = 0.0             # share of the current prefill's layers done (0 when none)
        self.current: Sequence | None = None
        self.current_kv: SequenceKV | None = None
        self._thread = threading.Thread(target=self._loop, name="rattn-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok().encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> list[int]:
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
        if self.config.request_timeout:
            seq.deadline = seq.arrival + self.config.request_timeout
        with self._lock:
            if self.dead or self._stopping.is_set():
                raise EngineUnavailable(f"the engine is not running ({self.dead or 'shutting down'})")
            if request.request_id in self._seqs:
                raise ValueError(f"duplicate request id {request.request_id}")
            try:
                self._queue.put_nowait(seq)
            except queue.Full:
                raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting)") from None
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
        return self._queue.qsize()

    @property
    def num_running(self) -> int:
        return 1 if self.current is not None else 0

    def cpu_kv_bytes(self) -> int:
        kv = self.current_kv
        return kv.cpu_bytes() if kv is not None else 0

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

    # ------------------------------------------------------------------ engine thread
    def _eos_ids(self) -> set[int]:
        ids = set()
        eos = getattr(self.model.hf_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _loop(self):
        try:
            if self.config.cpu_threads:
                import numba

                numba.set_num_threads(self.config.cpu_threads)  # thread-local: set where the kernels run
            while True:
                self.progress_at = time.monotonic()
                try:
                    seq = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self._stopping.is_set():
                        return
                    continue
                self.current = seq
                ctx = request_id.set(seq.request.request_id)  # this request's id on the engine's log lines
                try:
                    self._run(seq)
                except Exception:  # _run ends its request in every case; this is a bug there, not fatal
                    log.exception("request %s: unexpected failure after its end", seq.request.request_id)
                finally:
                    request_id.reset(ctx)
                    self.current = self.current_kv = None
                    self.prefill_done = 0.0
                with self._lock:  # ended; a fatal error skips this, so the request gets its error below
                    self._seqs.pop(seq.request.request_id, None)
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
                finish = "abort" if seq.aborted.is_set() else "error"
                self._emit(seq, StepOutput(seq.request.request_id, None, "", None, finish,
                                           f"the engine is not running ({self.dead})", len(seq.request.prompt_ids),
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

    def _prefill_progress(self, seq: Sequence, N: int):
        """on_layer callback of the prefill: heartbeat, progress log and metric, early stop."""
        L = self.shape.n_layers
        logged = [time.monotonic()]

        def on_layer(l: int):
            now = self.progress_at = time.monotonic()
            self.prefill_done = (l + 1) / L
            if now - logged[0] >= PROGRESS_LOG_S:
                logged[0] = now
                log.info("request %s: prefill %d/%d layers of %d tokens", seq.request.request_id, l + 1, L, N)
            if self._stop_reason(seq):
                raise _Stop()

        return on_layer

    def _run(self, seq: Sequence):
        req, sp = seq.request, seq.request.sampling
        ids = req.prompt_ids
        N = len(ids)
        t_start = time.monotonic()
        t_first: float | None = None

        def emit(token, text, sample=None, finish=None, error=None):
            self._emit(seq, StepOutput(req.request_id, token, text, sample, finish, error, N, len(seq.generated)))

        def timed_out():  # out of time before its first token: ended like one out of tokens, with none
            log.info("request %s: --request-timeout (%g s) reached before its first token", req.request_id,
                     self.config.request_timeout)
            emit(None, "", finish="length")

        def ended_early():
            emit(None, "", finish="abort") if self._stop_reason(seq) == "abort" else timed_out()

        if self._stop_reason(seq):
            ended_early()
            return
        try:
            kv = SequenceKV(self.shape, seq.attention, N + sp.max_tokens, self.device, self.model.dtype,
                            self.copy_scores)
            self.current_kv = kv
            try:
                logits, stats = self.runner.prefill(ids, kv, on_layer=self._prefill_progress(seq, N))
            except _Stop:
                ended_early()
                return
            self.prefill_done = 0.0
            if self.observer:
                self.observer.on_prefill(stats)
            sampler = Sampler(sp, self.shape.vocab_size, self.device)
            detok = IncrementalDetokenizer(self.tokenizer, sp.stop) if self.tokenizer is not None else None
            stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_ids)
            top_k = seq.attention.top_k
            for i in range(sp.max_tokens):
                self.progress_at = time.monotonic()
                reason = self._stop_reason(seq)
                if reason:  # a request out of time ends as if it had reached its max_tokens (--request-timeout)
                    emit(None, detok.flush() if detok else "", finish="abort" if reason == "abort" else "length")
                    return
                res = sampler(logits)
                t_first = t_first or time.monotonic()
                seq.generated.append(res.token)
                if res.token in stop_ids:
                    emit(res.token, detok.flush() if detok else "", res, "stop")
                    return
                text, stopped = detok.add(res.token) if detok else ("", False)
                if stopped:
                    emit(res.token, text, res, "stop")
                    return
                if i == sp.max_tokens - 1:
                    emit(res.token, text + (detok.flush() if detok else ""), res, "length")
                    return
                emit(res.token, text, res)
                t = time.perf_counter()
                logits = self.runner.decode(res.token, N + i, kv, top_k)
                if self.observer:
                    self.observer.on_decode_step(time.perf_counter() - t, kv.take_retrieval_seconds())
        except Exception as e:  # a failure ends this request, never the engine
            log.exception("request %s failed", req.request_id)
            emit(None, "", finish="error", error=f"{type(e).__name__}: {e}")
        finally:
            if self.current_kv is not None:
                self.current_kv.free()
            if self.observer and t_first is not None:
                end = time.monotonic()
                self.observer.on_request_done(RequestTimes(t_start - seq.arrival, t_first - t_start, end - t_first))
