"""Exact query -> key top-L by matrix products: the input of the attention-aware graph build."""
from __future__ import annotations

import numpy as np
import torch


def exact_topk(queries, keys, L: int, chunk_elems: int = 1 << 26) -> np.ndarray:
    """queries (m, d), keys (n, d) as numpy or torch (on any device) -> (m, min(L, n)) int64 numpy,
    best first. Runs where the tensors are (the GPU during CUDA prefill), in row chunks whose score
    matrix stays within chunk_elems floats (256 MB), so that a long prompt's build fits beside it."""
    q = torch.as_tensor(queries)
    k = torch.as_tensor(keys).to(q.device, q.dtype)
    L = min(L, k.shape[0])
    chunk = max(1, chunk_elems // max(1, k.shape[0]))
    out = torch.empty((q.shape[0], L), dtype=torch.int64, device=q.device)
    for s in range(0, q.shape[0], chunk):
        out[s:s + chunk] = (q[s:s + chunk] @ k.T).float().topk(L, dim=1).indices
    return out.cpu().numpy()
