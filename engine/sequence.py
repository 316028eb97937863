"""A request and what the engine streams back for it."""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .attention import AttentionConfig
from .sampling import SampleResult, SamplingParams

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


@dataclass
class Sequence:
    """Engine-side state of one request."""

    request: Request
    attention: AttentionConfig
    on_output: Callable[[StepOutput], None]
    aborted: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which the request ends (--request-timeout)
