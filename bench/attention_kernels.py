"""One decode query per head over a layer's whole K/V (what `full` mode does each layer): torch SDPA
call shapes and backends side by side, on synthetic bf16 tensors of the Llama-3-8B layout.

    python bench/attention_kernels.py --contexts 32768,131072 --out bench/results/attention_kernels_h200.json

Variants: the group's query heads as that group's "sequence" (q (1, G, H/G, d), what `full` mode did),
and one position per query head with enable_gqa (q (1, H, 1, d)); each with SDPA's default backend
choice and with one backend forced. Each figure is one call (one layer), median of many, CUDA events.
The K/V length changes by one every call, as in decoding (a backend that plans per shape pays for it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_variant(q, k, v, shape: str, backend, iters: int) -> float | str:
    H, d = q.shape[0], q.shape[1]
    G = k.shape[1]
    T = k.shape[2]

    def call(t):
        kk, vv = k[:, :, :t], v[:, :, :t]
        if shape == "group_as_sequence":
            return F.scaled_dot_product_attention(q.view(1, G, H // G, d), kk, vv)
        return F.scaled_dot_product_attention(q.view(1, H, 1, d), kk, vv, enable_gqa=True)

    ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    try:
        with ctx:
            for i in range(3):
                call(T - 64 + i)
            times = []
            for i in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                call(T - iters + i)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
        return round(statistics.median(times), 4)
    except RuntimeError as e:
        return f"unavailable: {str(e).splitlines()[0][:120]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="bench/results/attention_kernels.json")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    H, G, d = a.heads, a.kv_heads, a.head_dim
    results = []
    for T in (int(x) for x in a.contexts.split(",")):
        k = torch.randn(1, G, T, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(H, d, device=dev, dtype=torch.bfloat16)
        ref = F.scaled_dot_product_attention(q.view(1, H, 1, d).float(), k.float(), v.float(), enable_gqa=True)
        row = {"context": T, "ms_per_call": {}, "max_abs_err_vs_fp32": {}}
        for shape in ("group_as_sequence", "gqa_one_position"):
            for name, backend in BACKENDS.items():
                key = f"{shape}/{name}"
                row["ms_per_call"][key] = time_variant(q, k, v, shape, backend, a.iters)
                if isinstance(row["ms_per_call"][key], float):
                    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                        o = (F.scaled_dot_product_attention(q.view(1, G, H // G, d), k, v)
                             if shape == "group_as_sequence"
                             else F.scaled_dot_product_attention(q.view(1, H, 1, d), k, v, enable_gqa=True))
                    row["max_abs_err_vs_fp32"][key] = round(float((o.reshape(H, d).float()
                                                                   - ref.reshape(H, d)).abs().max()), 5)
        bytes_read = 2 * G * T * d * 2
        row["kv_bytes_per_call"] = bytes_read
        row["bandwidth_bound_ms_at_4.8TBps"] = round(bytes_read / 4.8e12 * 1e3, 4)
        print(json.dumps(row), flush=True)
        results.append(row)
        del k, v
    out = {"bench": "attention_kernels", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "synthetic": True, "layout": {"heads": H, "kv_heads": G, "head_dim": d, "dtype": "bfloat16"},
           "command": "python bench/attention_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
