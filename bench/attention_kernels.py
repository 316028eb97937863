"""One decode query per head over a layer's whole K/V (what `full` mode does each layer): torch SDPA
call shapes and backends, and engine/attention_cuda.py's fused kernels over a sweep of their tiles, side by
side, on synthetic bf16 tensors of the Llama-3-8B layout.

    python bench/attention_kernels.py --contexts 32768,131072 --out bench/results/attention_kernels_h200.json

Variants: the group's query heads as that group's "sequence" (q (1, G, H/G, d), what `full` mode did),
and one position per query head with enable_gqa (q (1, H, 1, d)); each with SDPA's default backend
choice and with one backend forced; and "fused/splits,block,warps,stages" (the default tiles: "fused/default").
Each figure is one call (one layer): the median over rounds of `--batch` calls queued back to back between two
CUDA events (as a decode step queues its layers, so the host's launch time hides as it does there). The K/V
length changes by one every call, as in decoding (a backend that plans per shape pays for it).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import attention_cuda  # noqa: E402

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
FUSED = [None] + [(s, b, w, st) for s in (64, 128) for b in (32, 64, 128) for w in (4, 8) for st in (2, 3)]


def fused(q, k, v, t: int, tiles) -> torch.Tensor:
    """The fused kernels over keys [0, t) of k, v (1, G, capacity, d), the new key and value being k/v[t]."""
    H, d = q.shape
    if (k.data_ptr(), t) not in fused.tables:  # made once per length (the timed rounds repeat theirs)
        fused.tables[k.data_ptr(), t] = torch.tensor([[0, *attention_cuda.offsets(k, [v]), k.shape[2], t, t]],
                                                     device=q.device)
    out = torch.empty(1, H, d, device=q.device, dtype=q.dtype)
    attention_cuda.decode_attention(q[None], k[0, :, t][None], v[0, :, t][None], k, fused.tables[k.data_ptr(), t],
                                    fused.parts, out, d ** -0.5, tiles)
    return out[0]


def time_variant(q, k, v, shape: str, backend, iters: int, batch: int) -> float | str:
    H, d = q.shape[0], q.shape[1]
    G = k.shape[1]
    T = k.shape[2] - 1  # the last slot: where the fused kernels write the new key

    def call(t):
        kk, vv = k[:, :, :t], v[:, :, :t]
        if shape == "fused":
            return fused(q, k, v, t - 1, backend)
        if shape == "group_as_sequence":
            return F.scaled_dot_product_attention(q.view(1, G, H // G, d), kk, vv)
        return F.scaled_dot_product_attention(q.view(1, H, 1, d), kk, vv, enable_gqa=True)

    ctx = sdpa_kernel([backend]) if backend is not None and shape != "fused" else contextlib.nullcontext()
    try:
        with ctx:
            for i in range(3):
                call(T - 64 + i)
            times = []
            for i in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for j in range(batch):
                    call(T - batch + j + 1)
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
    ap.add_argument("--no-sweep", action="store_true", help="the fused kernels' default tiles only")
    ap.add_argument("--out", default="bench/results/attention_kernels.json")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    H, G, d = a.heads, a.kv_heads, a.head_dim
    fused.parts = attention_cuda.Partials(1, G, H, d, dev)  # one row's: room for MAX_SPLITS splits
    fused.tables = {}
    results = []
    for T in (int(x) for x in a.contexts.split(",")):
        k = torch.randn(1, G, T + 1, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(H, d, device=dev, dtype=torch.bfloat16)
        kT, vT = k[:, :, :T].float(), v[:, :, :T].float()
        ref = F.scaled_dot_product_attention(q.view(1, H, 1, d).float(), kT, vT, enable_gqa=True)
        row = {"context": T, "ms_per_call": {}, "max_abs_err_vs_fp32": {}}
        variants = [(shape, name, backend) for shape in ("group_as_sequence", "gqa_one_position")
                    for name, backend in BACKENDS.items() if name in a.backends.split(",")]
        variants += [("fused", ",".join(map(str, t)) if t else "default", t) for t in FUSED[:1 if a.no_sweep else None]]
        for shape, name, backend in variants:
            key = f"{shape}/{name}"
            row["ms_per_call"][key] = time_variant(q, k, v, shape, backend, a.iters, a.batch)
            if isinstance(row["ms_per_call"][key], float):
                if shape == "fused":
                    o = fused(q, k, v, T - 1, backend)  # keys [0, T - 1) and the new one, T - 1
                else:
                    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                        o = (F.scaled_dot_product_attention(q.view(1, G, H // G, d), k[:, :, :T], v[:, :, :T])
                             if shape == "group_as_sequence" else
                             F.scaled_dot_product_attention(q.view(1, H, 1, d), k[:, :, :T], v[:, :, :T],
                                                            enable_gqa=True))
                row["max_abs_err_vs_fp32"][key] = round(float((o.reshape(H, d).float()
                                                               - ref.reshape(H, d)).abs().max()), 5)
        bytes_read = 2 * G * T * d * 2
        row["kv_bytes_per_call"] = bytes_read
        row["bandwidth_bound_ms_at_4.8TBps"] = round(bytes_read / 4.8e12 * 1e3, 4)
        fastest = [(t, key) for key, t in row["ms_per_call"].items() if isinstance(t, float) and key.startswith("fused")]
        row["fastest_fused"] = min(fastest)[1] if fastest else None
        print(json.dumps(row), flush=True)
        results.append(row)
        del k, v
        fused.tables.clear()
    out = {"bench": "attention_kernels", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "synthetic": True, "layout": {"heads": H, "kv_heads": G, "head_dim": d, "dtype": "bfloat16"},
           "command": "python bench/attention_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
