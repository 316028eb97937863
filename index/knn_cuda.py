"""Each build query's exact top-L keys on CUDA without writing its scores to memory: two Triton passes over the
16-bit query x key product (float32 accumulation), where torch's product would write 4.3 GB of scores per KV
head at 128K tokens and read them back.

1. `_block_max`: the maximum of each row over each block of BN keys (8,192 x 1,024 floats at 128K).
2. A row's top L scores are all at least tau, the L-th largest of its block maxima (L distinct blocks hold a
   score >= tau), and all lie in its L best blocks (ties at tau aside). `_collect` recomputes the products of
   those (row, block) pairs only, grouped by block, and appends each row's scores >= tau to that row's list
   of C candidates (a counter per row, atomically).
3. torch.topk over the C candidates. A row with more than C candidates (many ties, or many high scores in
   its best blocks) is redone by the torch path.

Rows go in chunks (index.knn), so that the block maxima stay within the caller's memory bound.

Used by index.knn on CUDA for bf16/fp16 queries and keys; bench/knn_topk.py measures it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BM, BN = 64, 128  # BN: index.knn.TOPK_BLOCK
CAP = 512          # candidates kept per row, per 64 of L
WARPS = 4          # the same tiles and warps in both passes: the same products, bit for bit
SPLIT = 4          # programs per block of keys in the second pass


@triton.jit
def _dot(q, k, cols, N):
    s = tl.dot(q, tl.trans(k))
    return tl.where(cols[None, :] < N, s, float("-inf"))


@triton.jit(do_not_specialize=["M", "N", "NB"])  # one compilation for every prompt length
def _block_max(Q, K, OUT, M, N, NB, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pm, pn = tl.program_id(0), tl.program_id(1)
    rows = pm * BM + tl.arange(0, BM)
    cols = pn * BN + tl.arange(0, BN)
    d = tl.arange(0, D)
    q = tl.load(Q + rows[:, None].to(tl.int64) * D + d[None, :], mask=rows[:, None] < M, other=0.0)
    k = tl.load(K + cols[:, None].to(tl.int64) * D + d[None, :], mask=cols[:, None] < N, other=0.0)
    tl.store(OUT + rows.to(tl.int64) * NB + pn, tl.max(_dot(q, k, cols, N), 1), mask=rows < M)


@triton.jit(do_not_specialize=["N"])
def _collect(Q, K, ROWS, OFF, TAU, CNT, CS, CI, N, C, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             SPLIT: tl.constexpr):
    """Block b's keys against the rows that have b among their L best blocks (ROWS[OFF[b]:OFF[b + 1]]), BM rows
    at a time, SPLIT programs per block (the sink block is in nearly every row's list)."""
    b, part = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(OFF + b) + part * BM, tl.load(OFF + b + 1)
    if start >= end:  # most blocks are in few rows' lists: no work, and no keys to read
        return
    cols = b * BN + tl.arange(0, BN)
    d = tl.arange(0, D)
    k = tl.load(K + cols[:, None].to(tl.int64) * D + d[None, :], mask=cols[:, None] < N, other=0.0)
    for i in range(start, end, BM * SPLIT):
        j = i + tl.arange(0, BM)
        live = j < end
        rows = tl.load(ROWS + j, mask=live, other=0)
        q = tl.load(Q + rows[:, None].to(tl.int64) * D + d[None, :], mask=live[:, None], other=0.0)
        s = _dot(q, k, cols, N)
        tau = tl.load(TAU + rows, mask=live, other=float("inf"))
        take = ((s >= tau[:, None]) & live[:, None]).to(tl.int32)
        base = tl.atomic_add(CNT + rows, tl.sum(take, 1), mask=live)  # the rows of one tile are distinct
        pos = base[:, None] + tl.cumsum(take, 1) - take
        ok = (take > 0) & (pos < C)
        at = rows[:, None].to(tl.int64) * C + pos
        tl.store(CS + at, s, mask=ok)
        tl.store(CI + at, cols[None, :], mask=ok)


def supported(q: torch.Tensor, k: torch.Tensor, L: int) -> bool:
    """Where the two passes apply: 16-bit CUDA tensors on a GPU with bf16 tensor cores (sm_80+), a
    power-of-two head size, and enough blocks of keys that skipping most of them pays (else one torch.topk
    is as good)."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(q.device) >=
            (8, 0) and d in (64, 128, 256) and k.shape[0] // BN > 2 * L)


def topk_ids(q: torch.Tensor, k: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (m, d), k (n, d) contiguous, 16-bit, on CUDA -> (ids (m, L) int64 best first, redo (m,) bool: rows with
    more candidates than the list holds, whose ids are not valid). Queued without a host sync. Memory: m x n/128
    floats of block maxima."""
    m, d = q.shape
    n = k.shape[0]
    nb = triton.cdiv(n, BN)
    bmax = torch.empty((m, nb), dtype=torch.float32, device=q.device)
    _block_max[(triton.cdiv(m, BM), nb)](q, k, bmax, m, n, nb, D=d, BM=BM, BN=BN, num_warps=WARPS)
    best = bmax.topk(L, dim=1)
    tau = best.values[:, -1]
    # the second pass takes scores a hair below tau: were its products ever to differ from the first
    # pass's in the last bits, no top-L score would fall out (a few more candidates, the same result)
    tau = (tau - tau.abs() * 2**-10 - 1e-3).contiguous()
    # (block, row) pairs grouped by block: each block's keys meet only the rows that need them
    pair = (best.indices.long() * m + torch.arange(m, device=q.device)[:, None]).flatten().sort().values
    rows = (pair % m).int()
    off = torch.searchsorted(pair // m, torch.arange(nb + 1, device=q.device)).int()  # bincount would sync
    cnt = torch.zeros(m, dtype=torch.int32, device=q.device)
    cap = CAP * max(1, L // 64)
    cs = torch.full((m, cap), float("-inf"), dtype=torch.float32, device=q.device)
    ci = torch.zeros((m, cap), dtype=torch.int32, device=q.device)
    _collect[(nb, SPLIT)](q, k, rows, off, tau, cnt, cs, ci, n, cap, D=d, BM=BM, BN=BN, SPLIT=SPLIT, num_warps=WARPS)
    return ci.gather(1, cs.topk(L, dim=1).indices).long(), (cnt > cap) | (cnt < L)
