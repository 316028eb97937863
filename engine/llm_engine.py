"""The engine: one thread that takes requests from a bounded FIFO queue and runs each to its end.

    engine = Engine(EngineConfig())
    seq = engine.submit(Request(prompt_ids, SamplingParams(...)), on_output)   # StepOutput callbacks
    engine.abort(seq.request.request_id)

Every request ends in exactly one final StepOutput (finish_reason stop | length | abort | error),
after which its KV stores and indexes are gone.
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
from .loader import EMBEDDED, load_model
from .model_runner import ModelRunner, PrefillStats
from .sampling import Sampler, SamplingParams
from .sequence import Request, Sequence, StepOutput

log = logging.getLogger("rattn.engine")


class QueueFull(RuntimeError):
    pass


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


class EngineObserver(Protocol):
    def on_prefill(self, stats: PrefillStats) -> None: ...
    def on_decode_step(self, seconds: float, retrieval_seconds_per_layer: float) -> None: ...


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
        self._queue: queue.Queue[Sequence | None] = queue.Queue(maxsize=config.max_queue)
        self._seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self.current_kv: SequenceKV | None = None
        self._thread = threading.Thread(target=self._loop, name="rattn-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

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
        with self._lock:
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
        return 1 if self.current_kv is not None else 0

    def cpu_kv_bytes(self) -> int:
        kv = self.current_kv
        return kv.cpu_bytes() if kv is not None else 0

    def shutdown(self):
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.runner.pool.shutdown(wait=False)

    # ------------------------------------------------------------------ engine thread
    def _eos_ids(self) -> set[int]:
        ids = set()
        eos = getattr(self.model.hf_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _loop(self):
        if self.config.cpu_threads:
            import numba

            numba.set_num_threads(self.config.cpu_threads)  # thread-local: set where the kernels run
        while True:
            seq = self._queue.get()
            if seq is None:
                return
            try:
                self._run(seq)
            finally:
                self.current_kv = None
                with self._lock:
                    self._seqs.pop(seq.request.request_id, None)

    def _run(self, seq: Sequence):
        req, sp = seq.request, seq.request.sampling
        ids = req.prompt_ids
        N = len(ids)

        def emit(token, text, sample=None, finish=None, error=None):
            seq.on_output(StepOutput(req.request_id, token, text, sample, finish, error, N, len(seq.generated)))

        if seq.aborted.is_set():
            emit(None, "", finish="abort")
            return
        try:
            kv = SequenceKV(self.shape, seq.attention, N + sp.max_tokens, self.device, self.model.dtype,
                            self.copy_scores)
            self.current_kv = kv
            logits, stats = self.runner.prefill(ids, kv)
            if self.observer:
                self.observer.on_prefill(stats)
            sampler = Sampler(sp, self.shape.vocab_size, self.device)
            detok = IncrementalDetokenizer(self.tokenizer, sp.stop) if self.tokenizer is not None else None
            stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_ids)
            top_k = seq.attention.top_k
            for i in range(sp.max_tokens):
                if seq.aborted.is_set():
                    emit(None, "", finish="abort")
                    return
                res = sampler(logits)
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
