"""`full` mode's decode attention on CUDA: one query per head over a layer's whole K/V, split over the keys
(flash-decoding), as two Triton kernels.

SDPA's flash kernel reads a 128K-token layer in ~0.14 ms plus a 10 us combine on an H200, short of the
memory's pace (0.11 ms for 537 MB); `bench/attention_kernels.py` compares them. Here:

1. `_split`: program (g, s) takes KV head g's keys [s * CHUNK, (s + 1) * CHUNK) for all of the group's query
   heads at once (each K/V byte is read once), with the online softmax, and writes its unnormalised output,
   running max and sum (base 2).
2. `_combine`: program (g, r) merges query head r of group g over the splits by log-sum-exp.

16-bit K/V only (float32 products would go through TF32); `full_attention` runs SDPA otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64        # keys per step of a split
SPLITS = 128      # splits per KV head at most (8 KV heads: ~8 programs per SM of an H200)
WARPS, STAGES = 4, 3
LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["N", "CHUNK"])  # one compilation for every K/V length
def _split(Q, K, V, PO, PM, PL, N, CHUNK, skg, skn, svg, svn, scale,
           PER: tl.constexpr, PP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    g, s = tl.program_id(0), tl.program_id(1)
    S = tl.num_programs(1)
    rows = tl.arange(0, PP)
    d = tl.arange(0, D)
    q = tl.load(Q + (g * PER + rows[:, None]) * D + d[None, :], mask=rows[:, None] < PER, other=0.0)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, N)
    m = tl.full([PP], float("-inf"), tl.float32)
    acc_l = tl.zeros([PP], tl.float32)
    acc = tl.zeros([PP, D], tl.float32)
    for b in range(start, end, BLOCK):
        cols = b + tl.arange(0, BLOCK)
        ok = cols < end
        k = tl.load(K + g * skg + cols[:, None] * skn + d[None, :], mask=ok[:, None], other=0.0)
        z = tl.dot(q, tl.trans(k)) * scale
        z = tl.where(ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        p = tl.exp2(z - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        v = tl.load(V + g * svg + cols[:, None] * svn + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        acc_l = acc_l * alpha + tl.sum(p, 1)
        m = m_new
    out = (g * S + s) * PP + rows
    tl.store(PO + out[:, None] * D + d[None, :], acc)
    tl.store(PM + out, m)
    tl.store(PL + out, acc_l)


@triton.jit
def _combine(PO, PM, PL, O, S, PER: tl.constexpr, PP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr):
    g, r = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    at = (g * S + s) * PP + r
    m = tl.load(PM + at, mask=s < S, other=float("-inf"))  # every split holds keys: its max is finite
    w = tl.exp2(m - tl.max(m, 0))
    l = tl.sum(w * tl.load(PL + at, mask=s < S, other=0.0), 0)
    o = tl.sum(w[:, None] * tl.load(PO + at[:, None] * D + d[None, :], mask=(s < S)[:, None], other=0.0), 0)
    tl.store(O + (g * PER + r) * D + d, (o / l).to(O.dtype.element_ty))


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and d in (64, 128, 256)
            and k.stride(-1) == 1 and torch.cuda.get_device_capability(q.device)[0] >= 8)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float, splits: int = SPLITS,
                   block: int = BLOCK, warps: int = WARPS, stages: int = STAGES) -> torch.Tensor:
    """q (H, d) over keys/values [0, n) of k, v (G, capacity, d) -> (H, d) in q's dtype. The tile settings
    are bench/attention_kernels.py's to sweep."""
    H, d = q.shape
    G = k.shape[0]
    per = H // G
    pp = max(16, triton.next_power_of_2(per))  # tl.dot's smallest tile
    chunk = triton.cdiv(triton.cdiv(n, splits), block) * block
    S = triton.cdiv(n, chunk)  # every split holds keys
    po = torch.empty(G, S, pp, d, dtype=torch.float32, device=q.device)
    pm = torch.empty(G, S, pp, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    q = q.contiguous()
    _split[(G, S)](q, k, v, po, pm, pl, n, chunk, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                   scale * LOG2E, PER=per, PP=pp, D=d, BLOCK=block, num_warps=warps, num_stages=stages)
    o = torch.empty_like(q)
    _combine[(G, per)](po, pm, pl, o, S, PER=per, PP=pp, D=d, SP=triton.next_power_of_2(S), num_warps=8)
    return o
