"""Exact query -> key top-L by matrix products: the input of the attention-aware graph build."""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("rattn.index")


class HostIds:
    """Key ids computed on the device, on their way to host memory. On CUDA the copy goes to pinned memory
    without blocking the caller (the prefill goes on with the next layer); `array()`, called by whoever
    builds from them, waits for it."""

    def __init__(self, ids: torch.Tensor):
        self._done = None
        if ids.device.type == "cuda":
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(ids.device))
        else:
            self._host = ids

    def array(self) -> np.ndarray:
        if self._done is not None:
            self._done.synchronize()
        return self._host.numpy()


TOPK_BLOCK = 128  # columns per block in `top_columns`'s first stage


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (r, d) @ k (n, d).T in float32. On CUDA, 16-bit inputs (a bf16 model's own queries and keys) go to
    the tensor cores with a float32 result: the same products as the float32 product of their values, in
    another order of summation, at a fraction of its time."""
    if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(q, k.T, out_dtype=torch.float32)
    return q.float() @ k.float().T


def top_columns(s: torch.Tensor, L: int, B: int = TOPK_BLOCK) -> torch.Tensor:
    """Top-L column ids of each row of s (r, n), best first. Each of a row's top L lies in a block of B columns
    whose maximum is at least the L-th score, and at most L blocks have such a maximum: so the L blocks with
    the largest maxima hold all of them (ties aside), and torch.topk runs over their L * B columns instead of
    all n (H200, 8,192 rows of 128K: see bench/knn_topk.py)."""
    r, n = s.shape
    nb = n // B
    if nb <= 2 * L:
        return s.topk(L, dim=1).indices
    blocks = s[:, :nb * B].view(r, nb, B)
    top = blocks.amax(2).topk(L, dim=1).indices  # (r, L)
    cand = blocks.gather(1, top[:, :, None].expand(r, L, B)).reshape(r, L * B)
    if n > nb * B:  # the last, partial block: its columns are candidates too
        cand = torch.cat([cand, s[:, nb * B:]], 1)
    j = cand.topk(L, dim=1).indices  # candidate positions -> columns, without a table of every candidate's
    col = top.gather(1, (j // B).clamp_(max=L - 1)) * B + j % B
    return torch.where(j >= L * B, j - L * B + nb * B, col)


def _topk(q: torch.Tensor, k: torch.Tensor, L: int, chunk_elems: int) -> torch.Tensor:
    """q (B, m, d), k (B, n, d) -> (B, m, L) int32 on q's device, best first."""
    B, m, n = q.shape[0], q.shape[1], k.shape[1]
    chunk = max(1, chunk_elems // max(1, n))
    out = torch.empty((B, m, L), dtype=torch.int32, device=q.device)
    fused = _fused(q, k, L)
    redo = []  # (batch entry, first row, its rows the fused passes could not do)
    for b in range(B):
        kb = k[b].to(q.dtype).contiguous()
        if fused is not None:
            rows = max(fused.BM, chunk_elems * fused.BN // n)  # block maxima within chunk_elems floats
            try:
                for s in range(0, m, rows):
                    ids, bad = fused.topk_ids(q[b, s:s + rows].contiguous(), kb, L)
                    out[b, s:s + rows] = ids
                    redo.append((b, s, bad))
                continue
            except torch.cuda.OutOfMemoryError:  # this prompt's, not the kernels': they stay on
                raise
            except Exception as e:  # a kernel that does not build here (too little shared memory, say)
                _fused_failed(e)
                fused, redo = None, [r for r in redo if r[0] != b]
        out[b] = _by_products(q[b], kb, L, chunk)
    if redo and bool(torch.cat([bad for _, _, bad in redo]).any()):  # rare: one host sync per call decides it
        for b, s, bad in redo:
            if len(rows := bad.nonzero().flatten() + s):
                out[b, rows] = _by_products(q[b, rows], k[b].to(q.dtype).contiguous(), L, chunk)
    return out


def _by_products(qb: torch.Tensor, kb: torch.Tensor, L: int, chunk: int) -> torch.Tensor:
    """qb (r, d) rows' top-L over kb (n, d) from their scores, `chunk` rows at a time -> (r, L) int32."""
    if not len(qb):
        return torch.empty((0, L), dtype=torch.int32, device=qb.device)
    return torch.cat([top_columns(_scores(qb[s:s + chunk], kb), L) for s in range(0, len(qb), chunk)]).int()


def warm_up_device(device: torch.device, dtype: torch.dtype, d: int, L: int = 64) -> bool:
    """Compile the fused graph input's Triton kernels now (about a second), not in the first long prompt.
    -> whether they apply to this device, dtype and head size, and built."""
    k = torch.randn(TOPK_BLOCK * (2 * L + 1), d, device=device).to(dtype)
    q = torch.randn(64, d, device=device).to(dtype)
    if _fused(q[None], k[None], L) is None:
        return False
    _topk(q[None], k[None], L, 1 << 26)
    return not _FUSED_OFF


_FUSED_OFF: list[Exception] = []  # why the fused passes are off in this process (no Triton, a failed build)


def _fused_failed(e: Exception):
    log.warning("the fused graph input is off (%s: %s): the torch path computes it", type(e).__name__, e)
    _FUSED_OFF.append(e)


def _fused(q: torch.Tensor, k: torch.Tensor, L: int):
    """index.knn_cuda where it applies (it needs Triton, so only CUDA imports it), else None."""
    if q.device.type != "cuda" or _FUSED_OFF:
        return None
    try:
        from . import knn_cuda
    except Exception as e:
        _fused_failed(e)
        return None
    return knn_cuda if knn_cuda.supported(q[0], k[0], L) else None


def exact_topk(queries, keys, L: int, chunk_elems: int = 1 << 26) -> np.ndarray:
    """queries (m, d), keys (n, d), or batches of both (B, m, d) / (B, n, d), as numpy or torch on any
    device -> (m, min(L, n)) or (B, m, min(L, n)) int32 numpy, best first. Runs where the tensors are
    (the GPU during CUDA prefill), one product per batch entry and row chunk (a loop over a few KV
    heads: on CPU it beats one strided bmm), whose scores stay within chunk_elems floats (256 MB), so
    that a long prompt's build fits beside it."""
    q = torch.as_tensor(queries)
    k = torch.as_tensor(keys).to(q.device)  # in q's dtype one head at a time: a long prompt's float32 keys
    # would take as much device memory as the layer's K and V together (4 GB at 1M tokens, 8 KV heads)
    single = q.dim() == 2
    if single:
        q, k = q[None], k[None]
    out = _topk(q, k, min(L, k.shape[1]), chunk_elems).cpu().numpy()
    return out[0] if single else out


def graph_knn_later(queries, keys, L: int, per_head: str) -> HostIds:
    """The build input of one layer's graphs: queries (m, H, d) prefill queries, keys (G, n, d) ->
    (A, rows, L), computed where the queries are and copied to the host without waiting. One graph per KV
    head (per_head "kv", A = G) takes the union of its query heads' queries (rows = H/G * m); one per query
    head ("query", A = H) its own (rows = m). Both come from the same scores: one product per KV head."""
    q = torch.as_tensor(queries)
    m, H, d = q.shape
    k = torch.as_tensor(keys).to(q.device)
    G = k.shape[0]
    per = H // G
    ids = _topk(q.reshape(m, G, per, d).permute(1, 2, 0, 3).reshape(G, per * m, d), k, min(L, k.shape[1]), 1 << 26)
    return HostIds(ids.reshape(H, m, -1) if per_head == "query" else ids)


def graph_knn(queries, keys, L: int, per_head: str) -> np.ndarray:
    """graph_knn_later, waited for: (A, rows, L) int32 numpy."""
    return graph_knn_later(queries, keys, L, per_head).array()
