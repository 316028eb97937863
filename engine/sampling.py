"""Sampling parameters and the per-request sampler (penalties, temperature, top-k, top-p, seed)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None         # None: off; n >= 0: chosen token's logprob and the n most likely

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError("presence_penalty and frequency_penalty must be between -2 and 2")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("top logprobs must be between 0 and 20")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        # below this a temperature only overflows the scaled logits (vLLM draws the same line)
        return self.temperature < GREEDY_BELOW


@dataclass
class SampleResult:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Sampler:
    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device):
        self.p = params
        self.counts = torch.zeros(vocab_size, device=device) if self._penalised else None
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.gen = torch.Generator(device=device).manual_seed(seed)

    @property
    def _penalised(self) -> bool:
        return self.p.presence_penalty != 0.0 or self.p.frequency_penalty != 0.0

    def __call__(self, logits: torch.Tensor) -> SampleResult:
        """logits (V,) float32 of the last position."""
        p = self.p
        x = logits
        if self.counts is not None:
            x = x - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        if p.greedy:
            token = int(torch.argmax(x))
        else:
            x = x / p.temperature
            if p.top_k and p.top_k < x.shape[0]:
                kth = torch.topk(x, p.top_k).values[-1]
                x = x.masked_fill(x < kth, float("-inf"))
            if p.top_p < 1.0:
                sx, si = torch.sort(x, descending=True)
                cum = torch.softmax(sx, -1).cumsum(-1)
                drop = cum - torch.softmax(sx, -1) >= p.top_p  # keep the smallest prefix reaching top_p
                drop[0] = False  # and never less than the top token (a top_p that rounds to 0 in float32)
                x = x.masked_fill(torch.zeros_like(drop).scatter(0, si, drop), float("-inf"))
            token = int(torch.multinomial(torch.softmax(x, -1), 1, generator=self.gen))
        if self.counts is not None:
            self.counts[token] += 1
        if p.logprobs is None:
            return SampleResult(token)
        lp = torch.log_softmax(logits, -1)
        top = []
        if p.logprobs:
            v, i = torch.topk(lp, p.logprobs)
            top = list(zip(i.tolist(), v.tolist()))
        return SampleResult(token, float(lp[token]), top)
