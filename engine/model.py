"""The whole transformer in one readable file: the Llama family (Llama 2/3, Mistral, Qwen2, Yi, SmolLM) and
Gemma 3 (q/k norms, four norms per block, GeLU-tanh, scaled embeddings, sliding-window layers with a
RoPE of their own).

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
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM")
GEMMA = ("gemma3_text",)


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
    sliding_window: int = 0        # keys a sliding-window layer attends to (its own included); 0: none
    sliding_layers: tuple = ()     # which layers attend within the sliding window (Gemma 3: 5 of every 6)
    query_pre_attn_scalar: float = 0.0  # Gemma: attention scores scale by its -1/2 power (0: head_dim's)

    @property
    def scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def layer_windows(self) -> list[int]:
        """Per layer: the keys it attends to back from each query, its own included (0: every key)."""
        return [self.sliding_window if l in self.sliding_layers else 0 for l in range(self.n_layers)]

    @property
    def global_layers(self) -> list[int]:
        """Layers that attend to every earlier token: the ones whose keys leave the device."""
        return [l for l in range(self.n_layers) if l not in self.sliding_layers]

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
            sliding_window=(getattr(c, "sliding_window", None) or 0) if c.model_type in GEMMA else 0,
            sliding_layers=tuple(i for i, t in enumerate(getattr(c, "layer_types", None) or [])
                                 if t == "sliding_attention") if c.model_type in GEMMA else (),
            query_pre_attn_scalar=(getattr(c, "query_pre_attn_scalar", None) or 0.0) if c.model_type in GEMMA else 0.0,
        )


@dataclass
class LayerWeights:
    """q/k/v and gate/up are each one fused weight (rows stacked in that order): a decode step reads them in
    one matrix-vector product each, not five narrower ones (small products run far below the memory's
    pace)."""
    attn_norm: torch.Tensor
    w_qkv: torch.Tensor              # (H * d + 2 * G * d, D)
    wo: torch.Tensor
    b_qkv: torch.Tensor | None
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor          # (2 * I, D)
    w_down: torch.Tensor
    q_norm: torch.Tensor | None = None      # Gemma 3: per head, before RoPE
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # Gemma 3: on the attention output, before the residual
    mlp_out_norm: torch.Tensor | None = None   # Gemma 3: on the MLP output, before the residual


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _qkv(x, attn_norm, w_qkv, b_qkv, q_norm, k_norm, cos, sin, eps: float, H: int, G: int, d: int):
    """A layer's roped q (T, H, d), k and v (T, G, d) from h (T, D) (module level and on tensors alone:
    torch.compile then makes one set of kernels for every layer)."""
    x = rms_norm(x, attn_norm, eps)
    q, k, v = F.linear(x, w_qkv, b_qkv).split([H * d, G * d, G * d], dim=-1)
    q, k, v = q.reshape(-1, H, d), k.reshape(-1, G, d), v.reshape(-1, G, d).contiguous()  # v: a view would keep the whole product alive
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def _finish(h, attn, wo, attn_out_norm, mlp_norm, w_gate_up, w_down, mlp_out_norm, eps: float, gelu: bool):
    """h (T, D) += the attention output attn (T, H * d) projected, then += the MLP's output, in place."""
    o = F.linear(attn, wo)
    h += o if attn_out_norm is None else rms_norm(o, attn_out_norm, eps)
    x = rms_norm(h, mlp_norm, eps)
    g, u = F.linear(x, w_gate_up).chunk(2, dim=-1)
    y = F.linear((F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u, w_down)
    h += y if mlp_out_norm is None else rms_norm(y, mlp_out_norm, eps)


class Transformer:
    def __init__(self, hf_config: PretrainedConfig, shape: ModelShape, embed: torch.Tensor,
                 layers: list[LayerWeights], norm: torch.Tensor, lm_head: torch.Tensor, chunk: int = 2048):
        """Norm weights are the multipliers themselves (Gemma's 1 + w is added by the loader)."""
        self.hf_config, self.shape = hf_config, shape
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.device, self.dtype = embed.device, embed.dtype
        self.chunk = chunk
        gemma = hf_config.model_type in GEMMA
        # the library's RoPE covers every variant the configs name (default, llama3, linear, yarn...); Gemma 3
        # has one per layer type
        self.rotary = (Gemma3RotaryEmbedding if gemma else LlamaRotaryEmbedding)(hf_config).to(self.device)
        self.rope_types = ["full_attention", "sliding_attention"] if gemma else [None]
        self.rope_of_layer = [int(l in shape.sliding_layers) for l in range(shape.n_layers)]
        self.windows = shape.layer_windows  # made once: window_of runs per layer and decode step
        self.scale = shape.scale
        self.gelu = gemma  # the MLP's activation: GeLU-tanh, else SiLU
        self._qkv, self._finish = _qkv, _finish  # `compile()` swaps in fused versions
        # Gemma scales the embeddings by sqrt(hidden), rounded to the weights' dtype as transformers does
        # (on the device: a decode step captured in a CUDA graph cannot copy it there)
        self.embed_scale = torch.tensor(shape.hidden_size ** 0.5, dtype=self.dtype, device=self.device) if gemma else None

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed[ids]
        return h * self.embed_scale if self.embed_scale is not None else h

    def window_of(self, l: int) -> int:
        """Keys layer l attends to back from each query, its own included (0: all)."""
        return self.windows[l]

    def rope(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> [(cos, sin) (T, 1, d) per RoPE type]: broadcast over heads; `qkv` picks its layer's."""
        out = []
        for t in self.rope_types:
            cos, sin = (self.rotary(self.embed[:1], positions[None]) if t is None
                        else self.rotary(self.embed[:1], positions[None], t))
            out.append((cos[0, :, None, :], sin[0, :, None, :]))
        return out

    def rope_of(self, start: int, end: int):
        """-> rope(a, b): the RoPE tables of positions [a, b) within [start, end), made per call, so that a
        long prompt never holds its whole table; except for dynamic RoPE, whose table depends on the
        largest position of the call: it is made once for [start, end), as a single forward pass would."""
        if "dynamic" in str(getattr(self.rotary, "rope_type", "")):
            tables = self.rope(torch.arange(start, end, device=self.device))
            return lambda a, b: [(c[a - start: b - start], s[a - start: b - start]) for c, s in tables]
        return lambda a, b: self.rope(torch.arange(a, b, device=self.device))

    def compile(self):
        """Fuse the elementwise work around the matmuls (norms, RoPE, residuals, the MLP's activation) into
        generated kernels: a decode step of an 8B model launches ~1,800 kernels eagerly, most of them tiny,
        and those launches, not the weights, bound it. CUDA only; the shapes compile on first use, which the
        runner makes at start (ModelRunner.compile)."""
        self._qkv, self._finish = torch.compile(_qkv), torch.compile(_finish)

    def qkv(self, l: int, h: torch.Tensor, rope: list):
        """h (T, D) -> roped q (T, H, d), k (T, G, d), v (T, G, d); rope: `rope(positions)` of the T tokens."""
        s, w = self.shape, self.layers[l]
        cos, sin = rope[self.rope_of_layer[l]]
        return self._qkv(h, w.attn_norm, w.w_qkv, w.b_qkv, w.q_norm, w.k_norm, cos, sin,
                         s.rms_norm_eps, s.n_heads, s.n_kv_heads, s.head_dim)

    def finish_layer(self, l: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + output projection, then residual + MLP, chunked over tokens, in place on h."""
        s, w = self.shape, self.layers[l]
        for a in range(0, h.shape[0], self.chunk):
            b = a + self.chunk
            self._finish(h[a:b], attn[a:b].reshape(-1, s.n_heads * s.head_dim), w.wo, w.attn_out_norm, w.mlp_norm,
                         w.w_gate_up, w.w_down, w.mlp_out_norm, s.rms_norm_eps, self.gelu)
        return h

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h_last, self.norm, self.shape.rms_norm_eps), self.lm_head).float()
