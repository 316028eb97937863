"""Index quality on real attention: q/k dumped from the embedded model, every layer and head.

For each kind (flat, hnsw, graph per KV head, graph per query head) over a sweep of search budgets:
recall@k, attention-mass recall (share of the exact softmax mass over the offloaded keys that the
retrieved set captures), % of keys scanned, microseconds per search on one core, build seconds, and
index bytes. Decode-like queries are the queries of the last `--test-queries` prompt positions; they
are excluded from the build, whose queries are sampled from the rest as the engine does.

    python bench/index_recall.py --tokens 8832 --budgets 100,150,200,400 --test-queries 16   # 8,192 offloaded keys
    python bench/index_recall.py --tokens 8192 --pool 9 --layers 0,6,12,18,24,29 --test-queries 16 \
        --budgets 100,200,300,400 --kinds flat,hnsw,graph-kv --out bench/results/index_recall_64k.json \
        --png bench/results/index_recall_64k.png                                         # 68K pooled keys
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.attention import AttentionConfig  # noqa: E402
from engine.kv import SequenceKV  # noqa: E402
from engine.llm_engine import Engine, EngineConfig  # noqa: E402
from index import IndexParams, OffloadedStore, graph_knn, warm_up  # noqa: E402


CORPUS = ("argparse", "logging", "json.decoder", "textwrap", "email.message", "subprocess", "typing", "inspect",
          "dataclasses", "pathlib", "tarfile", "zipfile", "http.client", "urllib.request", "asyncio.tasks",
          "unittest.case", "pdb", "difflib", "enum", "functools", "collections", "threading", "shutil", "tempfile")


def corpus_ids(tokenizer, n_tokens: int, part: int = 0) -> list[int]:
    """Varied real text that ships with Python (standard-library sources): the part-th n_tokens window
    of their concatenation, so that pooled inputs are different texts."""
    import importlib

    text = "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS)
    ids = tokenizer.encode(text)
    if (part + 1) * n_tokens > len(ids):
        raise ValueError(f"the corpus has {len(ids)} tokens: not enough for part {part} of {n_tokens}")
    return ids[part * n_tokens:(part + 1) * n_tokens]


def dump(engine: Engine, n_tokens: int, part: int = 0):
    ids = corpus_ids(engine.tokenizer, n_tokens, part)
    s = engine.shape
    Q = np.zeros((s.n_layers, len(ids), s.n_heads, s.head_dim), np.float32)
    K = np.zeros((s.n_layers, len(ids), s.n_kv_heads, s.head_dim), np.float32)

    def capture(l, a, q, k):
        Q[l, a:a + q.shape[0]] = q.float().numpy()
        K[l, a:a + k.shape[0]] = k.float().numpy()

    kv = SequenceKV(s, AttentionConfig(mode="streaming"), len(ids) + 1, engine.device, engine.model.dtype)
    t = time.perf_counter()
    engine.runner.prefill(ids, kv, capture=capture)
    return Q, K, time.perf_counter() - t


def build_positions(n_tokens: int, n_test: int, m: int) -> np.ndarray:
    """m prompt positions spread evenly before the test queries: the prefill queries a build may use."""
    return np.unique(np.linspace(0, n_tokens - n_test - 1, m).astype(np.int64))


def evaluate(Qt, Qb, K_off, kinds, budgets, k, knn_L, scale, dtype="float32"):
    """Qt (L, T, H, d): decode-like test queries; Qb (L, m, H, d): the build's prefill queries; K_off
    (L, n, G, d): the offloaded keys searched (one input's, or several inputs' pooled)."""
    L, T, H, d = Qt.shape
    warm_up()  # compile before anything is timed
    G = K_off.shape[2]
    per = H // G
    rows = {}
    for name, kind, per_head in kinds:
        for ef in budgets:
            rows[(name, ef)] = {"recall": [], "mass": [], "rel_mass": [], "scanned": [], "us": []}
        rows[(name, "build_s")] = 0.0
        rows[(name, "bytes")] = 0
    for l in range(L):
        Koff = np.ascontiguousarray(K_off[l].transpose(1, 0, 2))  # (G, n, d)
        n = Koff.shape[1]
        qt = Qt[l]  # (T, H, d)
        # exact answers per head
        scores = np.einsum("thd,hnd->thn", qt, np.repeat(Koff, per, axis=0)) * scale  # (T, H, n)
        exact = np.argsort(-scores, axis=-1)[..., :k]
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        exact_mass = np.take_along_axis(p, exact, -1).sum(-1)  # (T, H): the best any k keys can capture
        qb = torch.from_numpy(Qb[l])  # (m, H, d)
        for name, kind, per_head in kinds:
            params = IndexParams(per_head=per_head, knn=knn_L, dtype=dtype)
            t = time.perf_counter()
            knn = None
            if kind == "graph":
                knn = graph_knn(qb, torch.from_numpy(Koff), knn_L, per_head)
            store = OffloadedStore(kind, G, H, d, params, with_values=False, capacity=n)
            store.load(Koff, None, knn)
            rows[(name, "build_s")] += time.perf_counter() - t
            rows[(name, "bytes")] += store.index_nbytes()
            for ef in budgets:
                store.p.ef = ef
                r = rows[(name, ef)]
                store.search(qt[0], k)  # warm
                t = time.perf_counter()  # the searches alone: scoring them below is not search time
                found = [store.search(qt[i], k) for i in range(T)]
                r["us"].append((time.perf_counter() - t) / (T * H) * 1e6)
                for i, (ids, scanned) in enumerate(found):
                    hit = ids >= 0
                    for h in range(H):
                        got = ids[h][hit[h]]
                        r["recall"].append(len(np.intersect1d(got, exact[i, h])) / k)
                        r["mass"].append(float(p[i, h, got].sum()))
                        r["rel_mass"].append(r["mass"][-1] / float(exact_mass[i, h]))
                        r["scanned"].append(scanned[h] / n if scanned[h] >= 0 else np.nan)
    out = []
    for name, kind, per_head in kinds:
        for ef in budgets:
            r = rows[(name, ef)]
            mass = np.array(r["mass"])
            sc = np.array(r["scanned"], dtype=np.float64)
            out.append({
                "kind": name, "ef": ef, "k": k,
                "recall_at_k_median": round(float(np.median(r["recall"])), 4),
                "mass_recall_median": round(float(np.median(mass)), 4),
                "mass_recall_p10": round(float(np.percentile(mass, 10)), 4),
                "mass_recall_mean": round(float(mass.mean()), 4),
                # captured mass / the exact top-k's mass: how close to the best k keys the index gets
                "mass_vs_exact_topk_median": round(float(np.median(r["rel_mass"])), 4),
                "mass_vs_exact_topk_p10": round(float(np.percentile(r["rel_mass"], 10)), 4),
                "scanned_pct_median": None if np.isnan(sc).all() else round(100 * float(np.nanmedian(sc)), 2),
                "scanned_pct_p90": None if np.isnan(sc).all() else round(100 * float(np.nanpercentile(sc, 90)), 2),
                "us_per_search_1core": round(float(np.mean(r["us"])), 2),
                "build_s_all_layers": round(rows[(name, "build_s")], 3),
                "index_bytes_all_layers": int(rows[(name, "bytes")]),
            })
            print(json.dumps(out[-1]), flush=True)
    return out


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(dict.fromkeys(r["kind"] for r in results))
    colors = {n: f"C{i}" for i, n in enumerate(names)}  # one colour per kind in every panel
    for name in names:
        rs = [r for r in results if r["kind"] == name]
        y = [r["mass_recall_median"] for r in rs]
        kw = dict(color=colors[name], label=name, marker="o")
        if rs[0]["scanned_pct_median"] is not None:  # hnswlib does not report its distance computations
            ax[0].plot([r["scanned_pct_median"] for r in rs], y, **kw)
        ax[1].plot([r["ef"] for r in rs], y, **kw)
        ax[2].plot([r["us_per_search_1core"] for r in rs], y, **kw)
    ax[0].set_xlabel("% of offloaded keys scanned (median; hnswlib does not report it)")
    ax[1].set_xlabel("search budget ef (candidate list size)")
    ax[2].set_xlabel("us per search, one core")
    for a in ax:
        a.set_ylabel("attention-mass recall (median)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8832)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--budgets", default="100,200,400,800")
    ap.add_argument("--test-queries", type=int, default=32)
    ap.add_argument("--query-stride", type=int, default=AttentionConfig().query_stride)
    ap.add_argument("--max-queries", type=int, default=AttentionConfig().max_queries)
    ap.add_argument("--knn", type=int, default=IndexParams().knn)
    ap.add_argument("--pool", type=int, default=1,
                    help="pool the offloaded keys of this many different inputs per layer and head "
                         "(test queries from the first; build queries spread over all, as over one "
                         "long prompt): larger stores from a short-context model")
    ap.add_argument("--layers", default="", help="comma-separated layer subset (default: all)")
    ap.add_argument("--kinds", default="flat,hnsw,graph-kv,graph-query")
    ap.add_argument("--dtype", default="float32", help="keys in the stores: float32 | bf16 | int8 (hnswlib: float32)")
    ap.add_argument("--out", default="bench/results/index_recall.json")
    ap.add_argument("--png", default="bench/results/index_recall.png")
    a = ap.parse_args(argv)
    numba.set_num_threads(1)  # per-search figures are for one core
    engine = Engine(EngineConfig(device="cpu"))
    cfg = AttentionConfig(query_stride=a.query_stride, max_queries=a.max_queries)
    # the engine's count for one prompt of all the pooled tokens, spread evenly over the inputs
    m = cfg.graph_queries(a.tokens * a.pool)
    pos = build_positions(a.tokens, a.test_queries, -(-m // a.pool))
    Q, K, prefill_s = dump(engine, a.tokens)
    layers = [int(x) for x in a.layers.split(",")] if a.layers else list(range(Q.shape[0]))
    Qt = np.ascontiguousarray(Q[layers, a.tokens - a.test_queries:])
    Qb, parts = [Q[np.ix_(layers, pos)]], [K[layers, cfg.sink:-cfg.window]]
    del Q, K
    for i in range(1, a.pool):
        Qi, Ki, _ = dump(engine, a.tokens, i)
        Qb.append(Qi[np.ix_(layers, pos)])
        parts.append(Ki[layers, cfg.sink:-cfg.window])
        del Qi, Ki
    Qb = np.ascontiguousarray(np.concatenate(Qb, axis=1))
    K_off = np.concatenate(parts, axis=1)
    del parts
    table = {"flat": ("flat", "flat", "kv"), "hnsw": ("hnsw", "hnsw", "kv"),
             "graph-kv": ("graph-kv", "graph", "kv"), "graph-query": ("graph-query", "graph", "query")}
    kinds = [table[x] for x in a.kinds.split(",")]
    budgets = [int(x) for x in a.budgets.split(",")]
    results = evaluate(Qt, Qb, K_off, kinds, budgets, a.k, a.knn, engine.shape.head_dim ** -0.5, a.dtype)
    report = {"bench": "index_recall", "model": "smollm2-135m-instruct", "tokens": a.tokens,
              "pooled_inputs": a.pool, "offloaded_keys": int(K_off.shape[1]), "layers": layers,
              "heads": int(Qt.shape[2]), "prefill_s_2cores": round(prefill_s, 2), "k": a.k,
              "build_queries_per_head": int(Qb.shape[1]), "knn": a.knn, "kv_store_dtype": a.dtype,
              "command": "python bench/index_recall.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    if a.png:
        plot(results, a.png, f"Index quality on real SmolLM2-135M queries: {K_off.shape[1]} offloaded keys"
             f"{f' pooled from {a.pool} inputs' if a.pool > 1 else ''}, {len(layers)} layers, all heads")
    print("wrote", a.out, a.png)
    engine.shutdown()


if __name__ == "__main__":
    main()
