"""A request and what the engine streams back for it."""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generator

from .attention import AttentionConfig
from .sampling import SampleResult, SamplingParams

if TYPE_CHECKING:
    from .detokenize import IncrementalDetokenizer
    from .doc_cache import DocEntry
    from .kv import SequenceKV
    from .sampling import Sampler

_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    attention: AttentionConfig | None = None      # None: the engine's default
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class StepOutput:
    request_id: str
    token: int | None              # None on a final event that carries no new token
    text: str                      # text released by this step (may be empty)
    sample: SampleResult | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated: int = 0
    error_status: int = 500        # with finish_reason "error": the HTTP status it stands for
    num_cached_tokens: int = 0     # prompt tokens whose K/V came from the document cache


@dataclass(eq=False)  # identity: the scheduler finds and removes a sequence, never compares prompts
class Sequence:
    """Engine-side state of one request."""

    request: Request
    attention: AttentionConfig
    on_output: Callable[[StepOutput], None]
    aborted: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which the request ends (--request-timeout)
    host_bytes: int = 0  # host memory its CPU stores may take at most (kv.host_bytes): what admission counts
    doc: DocEntry | None = None  # the document-cache entry it uses (a reference it holds until it ends)
    doc_making: tuple[DocEntry, int] | None = None  # the entry its prefill makes, and the bytes reserved for it
    cached_tokens: int = 0  # prompt tokens it reuses from the document cache
    doc_hashes: list[bytes] | None = None  # its prompt's block hashes (DocCache.prompt_chain), made once
    # set by the engine thread once the request leaves the queue
    kv: SequenceKV | None = None
    prefill: Generator[int, None, Any] | None = None  # the prefill in progress (ModelRunner.prefill_steps)
    sampler: Sampler | None = None
    detok: IncrementalDetokenizer | None = None
    stop_ids: set[int] = field(default_factory=set)
    started: float | None = None   # time.monotonic() when its prefill began
    first_token: float | None = None

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)
