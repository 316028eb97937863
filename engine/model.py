"""The whole Llama-family transformer in one readable file (Llama 2/3, Mistral, Qwen2, Yi, SmolLM).

Weights are plain tensors, the forward pass is split at the one place where attention modes differ:
`qkv()` gives a layer's roped queries, keys and values, the caller attends, and `finish_layer()`
applies the output projection and the MLP. Both work on any number of tokens, in chunks, so that a
128K-token prefill never materialises a full-width activation of the MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf(cls, c: PretrainedConfig) -> "ModelShape":
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases without saying so in its config
            attention_bias=bool(getattr(c, "attention_bias", False)) or c.model_type == "qwen2",
        )


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    mlp_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Transformer:
    def __init__(self, hf_config: PretrainedConfig, shape: ModelShape, embed: torch.Tensor,
                 layers: list[LayerWeights], norm: torch.Tensor, lm_head: torch.Tensor, chunk: int = 2048):
        self.hf_config, self.shape = hf_config, shape
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.device, self.dtype = embed.device, embed.dtype
        self.chunk = chunk
        # the library's RoPE covers every variant the configs name (default, llama3, linear, yarn...)
        self.rotary = LlamaRotaryEmbedding(hf_config).to(self.device)
        self.scale = shape.head_dim ** -0.5

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(self.embed[:1], positions[None])
        return cos[0, :, None, :], sin[0, :, None, :]  # (T, 1, d): broadcast over heads

    def rope_of(self, start: int, end: int):
        """-> rope(a, b): the (cos, sin) of positions [a, b) within [start, end), made per call, so that a
        long prompt never holds its whole table; except for dynamic RoPE, whose table depends on the
        largest position of the call: it is made once for [start, end), as a single forward pass would."""
        if "dynamic" in getattr(self.rotary, "rope_type", ""):
            cos, sin = self.rope(torch.arange(start, end, device=self.device))
            return lambda a, b: (cos[a - start: b - start], sin[a - start: b - start])
        return lambda a, b: self.rope(torch.arange(a, b, device=self.device))

    def qkv(self, l: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h (T, D) -> roped q (T, H, d), k (T, G, d), v (T, G, d)."""
        s, w = self.shape, self.layers[l]
        x = rms_norm(h, w.attn_norm, s.rms_norm_eps)
        q = F.linear(x, w.wq, w.bq).view(-1, s.n_heads, s.head_dim)
        k = F.linear(x, w.wk, w.bk).view(-1, s.n_kv_heads, s.head_dim)
        v = F.linear(x, w.wv, w.bv).view(-1, s.n_kv_heads, s.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def finish_layer(self, l: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + output projection, then residual + MLP, chunked over tokens, in place on h."""
        s, w = self.shape, self.layers[l]
        for a in range(0, h.shape[0], self.chunk):
            b = a + self.chunk
            h[a:b] += F.linear(attn[a:b].reshape(-1, s.n_heads * s.head_dim), w.wo)
            x = rms_norm(h[a:b], w.mlp_norm, s.rms_norm_eps)
            h[a:b] += F.linear(F.silu(F.linear(x, w.w_gate)) * F.linear(x, w.w_up), w.w_down)
        return h

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h_last, self.norm, self.shape.rms_norm_eps), self.lm_head).float()
