"""One layer's prefill attention at a long context, the ways the prefill could call it, side by side on
synthetic bf16 tensors of the Llama-3-8B layout (32 query heads, 8 KV heads, head_dim 128):

    python bench/prefill_attention.py --context 131072 --out bench/results/prefill_attention_h200.json

- `chunks/flash`: what the prefill did, chunk by chunk of queries over every earlier key, a lower-right
  causal mask (FlashAttention-2 through SDPA).
- `whole/<backend>`: one causal call over the whole prompt (what a plain transformers forward does; it
  needs the whole prompt's queries and outputs on the device at once).
- `chunks_split/cudnn`: what the prefill does on CUDA now (`engine.model_runner.causal_chunk_cudnn`): each
  chunk as two cuDNN calls, the earlier keys unmasked and the chunk's own keys causal, merged by their
  log-sum-exp (cuDNN has no lower-right mask).
Each figure is the seconds of one layer, median of --reps, CUDA events (`first_call_s`: the first
call, cuDNN's plans for each new shape included); `max_abs_err` against `chunks/flash`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.model_runner import causal_chunk_cudnn  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def chunks_flash(q, k, v, chunk):
    out = torch.empty_like(q)
    T = q.shape[2]
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b],
                                                        attn_mask=causal_lower_right(b - a, b), enable_gqa=True)
    return out


def whole(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def chunks_split_cudnn(q, k, v, chunk):
    """The engine's own function, on its layout: q (T, H, d), k/v (T, G, d) of the whole layer."""
    qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
    out = torch.empty_like(q)
    T = q.shape[2]
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        out[:, :, a:b] = causal_chunk_cudnn(qt[a:b], kt[:b], vt[:b], a, q.shape[-1] ** -0.5)
    return out


def timed(fn, reps):
    t = time.perf_counter()
    fn()  # warm-up: plans, workspaces
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return round(statistics.median(times), 4), round(first, 4), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--chunks", default="2048,8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/prefill_attention.json")
    a = ap.parse_args(argv)
    dev, T, H, G, d = torch.device("cuda"), a.context, 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(0)
    # the engine's layout: (T, heads, d) per layer, seen as (1, heads, T, d) by SDPA
    q, k, v = (torch.randn(T, n, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(0, 1)[None]
               for n in (H, G, G))
    rows, ref = {}, None
    variants = [(f"chunks{c}/flash", lambda c=c: chunks_flash(q, k, v, c)) for c in map(int, a.chunks.split(","))]
    variants += [(f"whole/{n}", lambda b=b: whole(q, k, v, b)) for n, b in BACKENDS.items()]
    variants += [(f"chunks_split{c}/cudnn", lambda c=c: chunks_split_cudnn(q, k, v, c))
                 for c in map(int, a.chunks.split(","))]
    for name, fn in variants:
        try:
            s, first, out = timed(fn, a.reps)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            rows[name] = {"error": str(e).splitlines()[0][:160]}
        else:
            ref = out if ref is None else ref
            rows[name] = {"s_per_layer": s, "first_call_s": first, "max_abs_err": round(float((out.float() - ref.float()).abs().max()), 4)}
            del out
        torch.cuda.empty_cache()
        print(name, json.dumps(rows[name]), flush=True)
    flops = 4 * H * d * T * T / 2  # causal: half the score and value products
    report = {"bench": "prefill_attention", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "synthetic": True, "context": T, "layout": {"heads": H, "kv_heads": G, "head_dim": d, "dtype": "bfloat16"},
              "causal_tflop_per_layer": round(flops / 1e12, 2),
              "command": "python bench/prefill_attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
