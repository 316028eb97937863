"""The graph build's input on the device: each build query's exact top-L keys over a whole layer, one KV
head at a time (index/knn.py exact_topk). At 128K tokens it is most of what `retrieval`'s prefill adds
to `flat`'s. Variants side by side on synthetic keys and queries of one KV head:

- `fp32`: float32 scores, one torch.topk per row over every key (what exact_topk did);
- `fp32-blocks`: the same scores, top-L of each block of B keys first, then top-L of those candidates
  (the same keys, up to ties);
- `bf16`, `bf16-blocks`: scores from a bf16 product (rounded to bf16: near-ties at the L-th key swap);
- `fp32-maxblocks`: float32 scores, torch.topk over the columns of the L blocks of 128 with the largest
  maxima (index.knn.top_columns: the same keys, up to ties);
- `mm-maxblocks`: the bf16 queries and keys on the tensor cores with a float32 result (the float32 product's
  values, summed in another order), then `top_columns` (what the prefill ran before `fused`);
- `fused`: index.knn_cuda's two Triton passes, which never write the scores (`redo_rows`: the share of rows
  left to the torch path);
- `engine`: what the prefill runs (index.knn), fused passes and redone rows included.

    python bench/knn_topk.py --keys 131072,1048576 --out bench/results/knn_topk_h200.json

Per variant: ms per KV head (CUDA events, median of --reps) and the share of the fp32 top-L sets kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from index.knn import _scores, _topk, top_columns  # noqa: E402


def blocks_topk(s: torch.Tensor, L: int, B: int) -> torch.Tensor:
    """Top-L column ids of each row of s (r, n), best first: top-L per block of B columns, then of those."""
    r, n = s.shape
    nb = n // B
    if nb < 2 or L > B:
        return s.topk(L, dim=1).indices
    part = s[:, : nb * B].view(r, nb, B).topk(L, dim=2)
    vals = part.values.reshape(r, nb * L)
    ids = (part.indices + (torch.arange(nb, device=s.device) * B)[:, None]).reshape(r, nb * L)
    if n > nb * B:
        tail = s[:, nb * B:].topk(min(L, n - nb * B), dim=1)
        vals, ids = torch.cat([vals, tail.values], 1), torch.cat([ids, tail.indices + nb * B], 1)
    return ids.gather(1, vals.topk(L, dim=1).indices)


def run(q: torch.Tensor, k: torch.Tensor, L: int, variant: str, B: int, chunk_elems: int) -> torch.Tensor:
    if variant == "engine":
        return _topk(q[None], k[None], L, chunk_elems)[0].long()
    if variant == "fused":
        from index import knn_cuda

        return knn_cuda.topk_ids(q, k, L)
    if variant == "mm-maxblocks":
        rows = max(1, chunk_elems // k.shape[0])
        return torch.cat([top_columns(_scores(q[a: a + rows], k), L) for a in range(0, q.shape[0], rows)])
    dt = torch.bfloat16 if variant.startswith("bf16") else torch.float32
    qq, kk = q.to(dt), k.to(dt)
    rows = max(1, chunk_elems // k.shape[0])
    out = torch.empty(q.shape[0], L, dtype=torch.long, device=q.device)
    for a in range(0, q.shape[0], rows):
        s = qq[a: a + rows] @ kk.T
        if variant.endswith("maxblocks"):
            out[a: a + rows] = top_columns(s, L)
        else:
            out[a: a + rows] = blocks_topk(s, L, B) if variant.endswith("blocks") else s.topk(L, dim=1).indices
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", default="131072,1048576")
    ap.add_argument("--queries", type=int, default=8192, help="build queries per KV head (4 query heads x 2,048)")
    ap.add_argument("--knn", type=int, default=64)
    ap.add_argument("--blocks", default="2048,8192")
    ap.add_argument("--variants", default="fp32,bf16,fp32-blocks,bf16-blocks,fp32-maxblocks,mm-maxblocks,fused,engine",
                    help="fp32 (the reference) runs first whatever this says")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/knn_topk.json")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for n in [int(x) for x in a.keys.split(",")]:
        # keys and queries with a shared direction, as real ones have: scores spread like attention logits
        k = (torch.randn(n, 128, device=dev, generator=g) + 0.5).to(torch.bfloat16)
        q = (torch.randn(a.queries, 128, device=dev, generator=g) + 0.5).to(torch.bfloat16)
        ref = None
        want = a.variants.split(",")
        variants = [("fp32", 0)] + [(v, 0) for v in ("bf16",) if v in want]
        variants += [(v, int(b)) for v in ("fp32-blocks", "bf16-blocks") if v in want for b in a.blocks.split(",")]
        variants += [(v, 0) for v in ("fp32-maxblocks", "mm-maxblocks", "fused", "engine") if v in want]
        for name, B in variants:
            times = []
            for _ in range(a.reps):
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                got = run(q, k, a.knn, name, B, 1 << 26)
                t1.record()
                torch.cuda.synchronize()
                times.append(t0.elapsed_time(t1))
            redo, want_ids = None, ref
            if name == "fused":  # its own rows only: the rows it leaves to the torch path are not its result
                got, bad = got
                redo = float(bad.float().mean())
                got, want_ids = got[~bad], ref[~bad]
            if ref is None:
                ref = got
                kept = 1.0
            else:  # share of the reference's top-L keys this variant also returns, per query
                kept = float((torch.sort(got, 1).values[:, :, None] == want_ids[:, None, :]).any(2).float().mean())
            rows.append({"keys": n, "variant": name, "block": B or None, "ms_per_kv_head": round(statistics.median(times), 2),
                         "kept_of_fp32_top": round(kept, 4), **({"redo_rows": round(redo, 5)} if redo is not None else {})})
            print(json.dumps(rows[-1]), flush=True)
    out = {"bench": "knn_topk", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "queries": a.queries, "knn": a.knn,
           "command": "python bench/knn_topk.py " + " ".join(sys.argv[1:] if argv is None else argv), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
