"""Which heads copy: a score per attention head, measured once per model when the engine starts.

A copying head asks, at decode time, for the one key whose context matches the current token's:
its score towers over every other key's while the keys around it score low, and no prefill query
looks like that query. A graph walk then never reaches it (measured on UUID needles at 8K tokens:
the target scores 110, the best key the walk reaches 0.2, and a wrong digit follows). Those few heads
scan their offloaded keys exactly instead. The probe is the standard one: a random token sequence
shown twice; a head's score is the larger of the attention it pays, from each token of the second
copy, to the same token in the first copy (duplicate-token head) or to the token after it
(induction head).
"""
from __future__ import annotations

import numpy as np
import torch

from .model import Transformer


@torch.inference_mode()
def copy_scores(model: Transformer, n: int = 128, seed: int = 0) -> np.ndarray:
    """-> (n_layers, n_heads) float32 in [0, 1]."""
    s = model.shape
    g = torch.Generator().manual_seed(seed)
    # ordinary tokens: the low ids of BPE vocabularies are bytes and special tokens
    half = torch.randint(s.vocab_size // 8, s.vocab_size, (n,), generator=g)
    ids = torch.cat([half, half]).to(model.device)
    T = 2 * n
    h = model.embed_tokens(ids).clone()
    rope = model.rope(torch.arange(T, device=model.device))
    causal = torch.ones(T, T, dtype=torch.bool, device=model.device).tril()
    rows = torch.arange(n, T - 1, device=model.device)  # the second copy, each with a next token
    out = torch.empty(s.n_layers, s.n_heads)
    per = s.n_heads // s.n_kv_heads
    for l in range(s.n_layers):
        q, k, v = model.qkv(l, h, rope)
        k, v = k.repeat_interleave(per, 1), v.repeat_interleave(per, 1)
        z = torch.einsum("thd,shd->hts", q.float(), k.float()) * model.scale
        p = torch.softmax(z.masked_fill(~causal, float("-inf")), -1)  # (H, T, T)
        out[l] = torch.maximum(p[:, rows, rows - n].mean(-1), p[:, rows, rows - n + 1].mean(-1)).cpu()
        attn = torch.einsum("hts,shd->thd", p, v.float()).to(h.dtype)
        model.finish_layer(l, h, attn)
    return out.numpy()
