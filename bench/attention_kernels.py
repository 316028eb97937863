"""One decode query per head over a layer's whole K/V (what `full` mode does each layer): torch SDPA
call shapes and backends side by side, on synthetic bf16 tensors of the Llama-3-8B layout.

    python bench/attention_kernels.py --contexts 32768,131072 --out bench/results/attention_kernels_h200.json

Variants: the group's query heads as that group's "sequence" (q (1, G, H/G, d), what `full` mode did),
and one position per query head with enable_gqa (q (1, H, 1, d)); each with SDPA's default backend
choice and with one backend forced; and engine/attention_cuda.py's split-K Triton kernels over a sweep of
their tile settings ("triton/splits,block,warps,stages"). Each figure is one call (one layer): the median
over rounds of `--batch` calls queued back to back between two CUDA events (as a decode step queues its
layers), so that the host's launch time hides as it does there. The K/V length changes by one every call, as
in decoding (a backend that plans per shape pays for it).
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

from engine.attention_cuda import full_attention

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


TRITON = [(s, b, w, st) for s in (64, 128, 256) for b in (64, 128) for w in (4, 8) for st in (2, 3, 4)]


def time_variant(q, k, v, shape: str, backend, iters: int, batch: int) -> float | str:
    H, d = q.shape[0], q.shape[1]
    G = k.shape[1]
    T = k.shape[2]

    def call(t):
        kk, vv = k[:, :, :t], v[:, :, :t]
        if shape == "triton":
            s, b, w, st = backend
            return full_attention(q, k[0], v[0], t, d ** -0.5, s, b, w, st)
        if shape == "group_as_sequence":
            return F.scaled_dot_product_attention(q.view(1, G, H // G, d), kk, vv)
        return F.scaled_dot_product_attention(q.view(1, H, 1, d), kk, vv, enable_gqa=True)

    ctx = sdpa_kernel([backend]) if backend is not None and shape != "triton" else contextlib.nullcontext()
    try:
        with ctx:
            for i in range(3):
                call(T - 64 + i)
            times = []
            for i in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for j in range(batch):
                    call(T - batch + j)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / batch)
        return round(statistics.median(times), 4)
    except RuntimeError as e:
        return f"unavailable: {str(e).splitlines()[0][:120]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="calls per timed round (a decode step's layers)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="SDPA backends to time")
    ap.add_argument("--no-triton", action="store_true")
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
        variants = [(shape, name, backend) for shape in ("group_as_sequence", "gqa_one_position")
                    for name, backend in BACKENDS.items() if name in a.backends.split(",")]
        variants += [] if a.no_triton else [("triton", ",".join(map(str, t)), t) for t in TRITON]
        for shape, name, backend in variants:
            key = f"{shape}/{name}"
            row["ms_per_call"][key] = time_variant(q, k, v, shape, backend, a.iters, a.batch)
            if isinstance(row["ms_per_call"][key], float):
                if shape == "triton":
                    o = full_attention(q, k[0], v[0], T, d ** -0.5, *backend)
                else:
                    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                        o = (F.scaled_dot_product_attention(q.view(1, G, H // G, d), k, v)
                             if shape == "group_as_sequence"
                             else F.scaled_dot_product_attention(q.view(1, H, 1, d), k, v, enable_gqa=True))
                row["max_abs_err_vs_fp32"][key] = round(float((o.reshape(H, d).float()
                                                               - ref.reshape(H, d)).abs().max()), 5)
        bytes_read = 2 * G * T * d * 2
        row["kv_bytes_per_call"] = bytes_read
        row["bandwidth_bound_ms_at_4.8TBps"] = round(bytes_read / 4.8e12 * 1e3, 4)
        tri = [(t, key) for key, t in row["ms_per_call"].items() if isinstance(t, float) and key.startswith("triton")]
        row["best_triton"] = min(tri)[1] if tri else None
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
