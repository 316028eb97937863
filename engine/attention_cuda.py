"""`full` mode's decode attention on CUDA, as two Triton kernels that a CUDA graph can hold for the whole step.

SDPA needs the K/V length and the request's buffers on the host, so a `full` step used to leave the graph at
every layer (33 graph launches and ~100 eager launches per 8B step: ~0.7 ms of the device idling between
them at 128K). Here each row's buffers, length and write slot are a row of a small device table (`TABLE`),
staged before the step, so CUDA graphs hold every layer's work (`FULL_GRAPH_LAYERS` per graph):

1. `_split`: program (row, KV head g, split s) takes a share of the keys already in the row's buffer for all
   of g's query heads at once (each K/V byte is read once), with the online softmax (flash-decoding), and
   writes its unnormalised output, running max and sum (base 2).
2. `_combine`: program (row, g, query head i) adds the step's own key and value (the q/k/v just computed),
   merges the splits by log-sum-exp, and (i = 0) writes the new key and value into the buffer: after every
   split has read it, so a ring that overwrites its oldest slot is still read whole (that slot is skipped).

A row of the table: where K and V are, in elements from a base tensor's address (an offset, not an address:
Triton then knows the loads' alignment and vectorises them; read as raw addresses, a split took 0.28 ms per
128K layer instead of 0.123 in a decode step on an H200), capacity (each buffer is (G, capacity, d), contiguous), keys to read
(slots [0, n)), the slot the new token goes to (never read). A padding row points at a one-slot buffer and
reads nothing.
"""
from __future__ import annotations

import torch

TABLE = 5  # int64 columns of a table row (the kernels read it too)
ALIGN = 16  # elements: buffer offsets are multiples of it (the allocator aligns to 512 bytes)
PROGRAMS = 1024  # split programs per step to aim for (8 KV heads, one row: 128 splits; ~8 per SM of an H200)
MAX_SPLITS = 128
LOG2E = 1.4426950408889634

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: `supported` says no
    triton = None

if triton is not None:
    _TABLE = tl.constexpr(TABLE)

    @triton.jit
    def _split(Q, BASE, TAB, PO, PM, PL, sq_r, sq_h, scale, S, G: tl.constexpr, PER: tl.constexpr, PP: tl.constexpr,
               D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr):
        rg, s = tl.program_id(0), tl.program_id(1)
        r, g = rg // G, rg % G
        row = TAB + r * _TABLE
        cap = tl.load(row + 2)
        n = tl.load(row + 3).to(tl.int32)
        skip = tl.load(row + 4).to(tl.int32)
        K = BASE + tl.multiple_of(tl.load(row), ALIGN) + g * cap * D
        V = BASE + tl.multiple_of(tl.load(row + 1), ALIGN) + g * cap * D
        heads = tl.arange(0, PP)
        d = tl.arange(0, D)
        q = tl.load(Q + r * sq_r + (g * PER + heads[:, None]) * sq_h + d[None, :], mask=heads[:, None] < PER,
                    other=0.0)
        chunk = tl.cdiv(tl.cdiv(n, S), BLOCK) * BLOCK
        start = s * chunk
        end = tl.minimum(start + chunk, n)  # a split past the keys reads none and leaves m = -inf, l = 0
        m = tl.full([PP], float("-inf"), tl.float32)
        acc_l = tl.zeros([PP], tl.float32)
        acc = tl.zeros([PP, D], tl.float32)
        for b in range(start, end, BLOCK):
            cols = b + tl.arange(0, BLOCK)
            ok = (cols < end) & (cols != skip)
            k = tl.load(K + cols[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            z = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            z = tl.where(ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of the skipped slot alone: no NaN
            p = tl.exp2(z - m_ref[:, None])
            alpha = tl.exp2(m - m_ref)
            v = tl.load(V + cols[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            acc_l = acc_l * alpha + tl.sum(p, 1)
            m = m_new
        out = (rg * S + s) * PER + heads
        keep = heads < PER
        tl.store(PO + out[:, None] * D + d[None, :], acc, mask=keep[:, None])
        tl.store(PM + out, m, mask=keep)
        tl.store(PL + out, acc_l, mask=keep)

    @triton.jit
    def _combine(Q, KN, VN, BASE, TAB, PO, PM, PL, O, sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, so_r, so_h, scale, S,
                 G: tl.constexpr, PER: tl.constexpr, D: tl.constexpr, SB: tl.constexpr):
        rg, i = tl.program_id(0), tl.program_id(1)
        r, g = rg // G, rg % G
        d = tl.arange(0, D)
        q = tl.load(Q + r * sq_r + (g * PER + i) * sq_h + d).to(tl.float32)
        kn = tl.load(KN + r * sk_r + g * sk_h + d)
        vn = tl.load(VN + r * sv_r + g * sv_h + d)
        zn = tl.sum(q * kn.to(tl.float32), 0) * scale  # the new key's score
        at = (rg * S) * PER + i
        mx = zn
        for s0 in range(0, S, SB):
            ss = s0 + tl.arange(0, SB)
            mx = tl.maximum(mx, tl.max(tl.load(PM + at + ss * PER, mask=ss < S, other=float("-inf")), 0))
        wn = tl.exp2(zn - mx)
        total = wn
        acc = wn * vn.to(tl.float32)
        for s0 in range(0, S, SB):
            ss = s0 + tl.arange(0, SB)
            w = tl.exp2(tl.load(PM + at + ss * PER, mask=ss < S, other=float("-inf")) - mx)
            total += tl.sum(w * tl.load(PL + at + ss * PER, mask=ss < S, other=0.0), 0)
            po = tl.load(PO + (at + ss[:, None] * PER) * D + d[None, :], mask=(ss < S)[:, None], other=0.0)
            acc += tl.sum(w[:, None] * po, 0)
        tl.store(O + r * so_r + (g * PER + i) * so_h + d, (acc / total).to(O.dtype.element_ty))
        if i == 0:
            row = TAB + r * _TABLE
            at_slot = g * tl.load(row + 2) * D + tl.load(row + 4) * D + d
            tl.store(BASE + tl.load(row) + at_slot, kn)
            tl.store(BASE + tl.load(row + 1) + at_slot, vn)


def supported(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether `decode_attention` serves this model: Triton present, a power-of-two head size (tl.arange),
    and a GPU with tensor-core tl.dot (sm80+)."""
    return (triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16, torch.float32)
            and head_dim in (16, 32, 64, 128, 256) and torch.cuda.get_device_capability(device)[0] >= 8)


def splits(rows: int, kv_heads: int) -> int:
    """Splits per (row, KV head): about PROGRAMS split programs per step, 16 to MAX_SPLITS."""
    return min(MAX_SPLITS, max(16, triton.next_power_of_2(max(1, PROGRAMS // (rows * kv_heads)))))


class Partials:
    """The split kernel's outputs for steps of up to `rows` rows (fixed addresses: graphs read them)."""

    def __init__(self, rows: int, kv_heads: int, heads: int, head_dim: int, device: torch.device):
        n = max(r * kv_heads * splits(r, kv_heads) for r in range(1, rows + 1)) * (heads // kv_heads)
        self.o = torch.empty(n, head_dim, dtype=torch.float32, device=device)
        self.m = torch.empty(n, dtype=torch.float32, device=device)
        self.l = torch.empty(n, dtype=torch.float32, device=device)


def offsets(base: torch.Tensor, tensors: list[torch.Tensor]) -> list[int]:
    """A table's K or V column: where each buffer starts, in elements from base's address."""
    out = [(t.data_ptr() - base.data_ptr()) // base.element_size() for t in tensors]
    assert all(o % ALIGN == 0 for o in out), "buffers are fresh allocations: 512-byte aligned"
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: torch.Tensor, table: torch.Tensor,
                     parts: Partials, out: torch.Tensor, scale: float,
                     tiles: tuple[int, int, int, int] | None = None):
    """One layer of a `full` step over R rows: q (R, H, d), the step's own k and v (R, G, d), table (R, TABLE)
    int64 on the device, its offsets from base's address -> out (R, H, d), and each row's new k/v written into
    its buffer. Host work only (no sync, no allocation): capturable. tiles (splits, keys per block, warps,
    stages): bench/attention_kernels.py's sweep (parts must hold the splits)."""
    R, H, D = q.shape
    G = k.shape[1]
    per = H // G
    assert q.stride(2) == k.stride(2) == v.stride(2) == out.stride(2) == 1 and base.dtype == q.dtype
    # fp32 products would go through TF32 by default: the fp32 path (tests) stays exact
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    # K and V tiles of at most 16 KB each per pipeline stage (64 KB in all: sm86/89 GPUs have ~100 KB)
    block = min(64, 16384 // (D * q.element_size()))
    S, block, warps, stages = tiles or (splits(R, G), block, 4, 2)
    assert R * G * S * per <= parts.m.numel() and table.shape == (R, TABLE) and table.is_contiguous()
    _split[(R * G, S)](q, base, table, parts.o, parts.m, parts.l, q.stride(0), q.stride(1), scale * LOG2E, S,
                       G=G, PER=per, PP=max(16, triton.next_power_of_2(per)), D=D, BLOCK=block, PREC=prec, ALIGN=ALIGN,
                       num_warps=warps, num_stages=stages)
    _combine[(R * G, per)](q, k, v, base, table, parts.o, parts.m, parts.l, out, q.stride(0), q.stride(1),
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                           scale * LOG2E, S, G=G, PER=per, D=D, SB=16, num_warps=4)
