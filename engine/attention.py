"""Attention modes and the partial-attention arithmetic they share.

Every mode runs the same decode step: the device attends over its static tokens, a retriever (or
none) attends over top-k offloaded tokens on the CPU, and the two partial results merge by
log-sum-exp. A mode is only a choice of placement and retriever.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from index import IndexParams

MODES = ("full", "streaming", "flat", "hnsw", "retrieval")
_STORE_KIND = {"flat": "flat", "hnsw": "hnsw", "retrieval": "graph"}
MIN_QUERIES = 256  # graph build queries of a short prompt: a few hundred cost little and cover its keys


@dataclass
class AttentionConfig:
    mode: str = "retrieval"
    top_k: int = 100          # keys retrieved per head and step from the CPU store
    sink: int = 128           # first tokens kept on the device
    window: int = 512         # last tokens kept on the device
    evict_block: int = 64     # tokens moved from the window to the CPU store at a time
    query_stride: int = 32    # graph build: one prefill query per head for every this many prompt tokens,
    max_queries: int = 2048   # at most this many (and at least MIN_QUERIES where the prompt has them)
    copy_threshold: float = 0.1  # retrieval: heads whose copy score reaches this scan their keys exactly (> 1: none)
    index: IndexParams = field(default_factory=IndexParams)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"attention mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.top_k < 1 or self.sink < 0 or self.window < 1 or self.evict_block < 1 or self.max_queries < 1 \
                or self.query_stride < 1:
            raise ValueError("attention: top_k >= 1, sink >= 0, window >= 1, evict_block >= 1, max_queries >= 1, "
                             "query_stride >= 1")
        if self.copy_threshold < 0:
            raise ValueError("attention: copy_threshold >= 0")

    @property
    def store_kind(self) -> str | None:
        return _STORE_KIND.get(self.mode)

    def graph_queries(self, n_tokens: int) -> int:
        """Prefill queries per head that shape the graph of an n_tokens prompt. They grow with the prompt:
        a fixed number leaves most keys of a long one in no query's top list, hence hard to reach."""
        return min(n_tokens, self.max_queries, max(MIN_QUERIES, n_tokens // self.query_stride))

    def override(self, **kw) -> "AttentionConfig":
        """A copy with the given non-None fields replaced (per-request overrides); index params by name."""
        kw = {k: v for k, v in kw.items() if v is not None}
        idx = {k: kw.pop(k) for k in list(kw) if k in IndexParams.__dataclass_fields__}
        out = replace(self, **kw)
        if idx:
            out = replace(out, index=replace(self.index, **idx))
        return out


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float):
    """One query per head over a key set: q (..., H, d), k/v (..., G, T, d), bias (..., T) additive (0 or
    -inf); leading dims (a batch of sequences) are optional and shared.

    Returns (o (..., H, d) normalised, m (..., H) max score, s (..., H) sum of exp(score - m)), all float32.
    A row with no keys (bias all -inf) gives o = 0, m = -inf, s = 0, never NaN: a NaN would reach the K/V
    that the row writes (a decode step's padding rows) and from there whoever attends to them."""
    *lead, G, T, d = k.shape
    qg = q.reshape(*lead, G, -1, d)
    z = torch.matmul(qg, k.transpose(-1, -2)).float() * scale + bias[..., None, None, :]  # (..., G, per, T)
    m = z.amax(-1, keepdim=True)
    p = torch.exp(z - m.clamp_min(torch.finfo(torch.float32).min))
    s = p.sum(-1, keepdim=True)
    o = torch.matmul(p.to(v.dtype), v).float() / s.clamp_min(torch.finfo(torch.float32).tiny)
    return o.reshape(*lead, -1, d), m.reshape(*lead, -1), s.reshape(*lead, -1)


def merge_partial_attention(o1, m1, s1, o2, m2, s2) -> torch.Tensor:
    """Combine two partial softmax-attention results over disjoint key sets (FlashAttention's rule);
    o (..., d), m and s (...).

    With m = max(m1, m2): o = (e^{m1-m} s1 o1 + e^{m2-m} s2 o2) / (e^{m1-m} s1 + e^{m2-m} s2).
    A part with no keys has m = -inf and s = 0 and drops out; two such parts give 0."""
    m = torch.maximum(m1, m2).clamp_min(torch.finfo(torch.float32).min)
    w1 = torch.exp(m1 - m) * s1
    w2 = torch.exp(m2 - m) * s2
    return (w1[..., None] * o1 + w2[..., None] * o2) / (w1 + w2).clamp_min(torch.finfo(torch.float32).tiny)[..., None]
