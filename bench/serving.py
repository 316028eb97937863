"""Serving-core figures: aggregate tokens/s against the number of concurrent requests, the same requests
one at a time, the largest gap between two tokens of running streams while a long prompt is
prefilled, and the time to first token of a question on a document, cold and then cached (the document
cache). The engine runs in-process (no HTTP); every request is distinct (its own prompt, which no
other run sends), but for the document's questions.

CPU, embedded model (8 chats of 1K-token prompts, 64 new tokens each):
    python bench/serving.py --context 1000 --max-tokens 64 --concurrency 1,2,4,8 --sequential 8 \
        --gap-context 8000 --out bench/results/serving_cpu.json
GPU machine, Llama-3.1-8B shape with dummy weights, 24 GB card emulated:
    python bench/serving.py --model llama-3.1-8b --load-format dummy --device cuda --gpu-mem-gb 24 \
        --context 32768 --concurrency 1,4,8 --steady-steps 48 --max-tokens 3000 --gap-context 131072 \
        --out bench/results/serving_h200.json
Document cache alone (--concurrency ''), an 8K document on CPU, 128K on the GPU machine:
    python bench/serving.py --concurrency '' --doc-context 8000 --out bench/results/doc_cache_cpu.json
"""
from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.decode_speed import prompt_ids  # noqa: E402
from engine.attention import AttentionConfig  # noqa: E402
from engine.llm_engine import Engine, EngineConfig  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.sequence import Request  # noqa: E402


class Recorder:
    """Submits requests and records when each of their tokens arrives."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.times: dict[str, list[float]] = {}
        self.submitted: dict[str, float] = {}
        self.finish: dict[str, str] = {}
        self.cached: dict[str, int] = {}
        self._left = 0
        self._done = threading.Condition()

    def submit(self, rid: str, ids: list[int], att: AttentionConfig, max_tokens: int):
        self.times[rid] = []
        with self._done:
            self._left += 1

        def on(o):
            if o.token is not None:
                self.times[rid].append(time.perf_counter())
                with self._done:  # wakes wait_steady (no polling: it would take the GIL from the engine)
                    self._done.notify_all()
            if o.finish_reason:
                self.cached[rid] = o.num_cached_tokens
                self.finish[rid] = o.finish_reason if not o.error else f"{o.finish_reason}: {o.error}"
                with self._done:
                    self._left -= 1
                    self._done.notify_all()

        self.submitted[rid] = time.perf_counter()
        self.engine.submit(Request(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), att,
                                   request_id=rid), on)

    def wait_steady(self, steps: int, timeout: float = 3600):
        """Until every request has made `steps` tokens after the last one's first token."""
        def ready():
            times = list(self.times.values())
            if any(not t for t in times):
                return False
            lo = max(t[0] for t in times)
            return min(len(t) - bisect.bisect_right(t, lo) for t in times) >= steps

        with self._done:
            assert self._done.wait_for(ready, timeout), "requests did not reach a steady state"

    def wait_first(self, rid: str, timeout: float = 3600):
        with self._done:
            assert self._done.wait_for(lambda: bool(self.times[rid]), timeout), f"{rid} made no token"

    def wait(self, timeout: float = 3600):
        with self._done:
            assert self._done.wait_for(lambda: self._left == 0, timeout), "requests did not finish"


class StepLog:
    """The engine's observer: when each decode step ended and what it spent (engine.DecodeStepStats)."""

    def __init__(self):
        self.steps: list[tuple[float, object]] = []

    def on_prefill(self, stats):
        pass

    def on_request_done(self, times):
        pass

    def on_decode_step(self, stats):
        self.steps.append((time.perf_counter(), stats))

    def split(self, lo: float, hi: float, requests: int) -> dict | None:
        """Medians over the steps of `requests` requests that ended in (lo, hi]: where a step's time went."""
        st = [s for t, s in self.steps if lo < t <= hi and s.requests == requests]
        if not st:
            return None

        def med(f):
            return round(1e3 * statistics.median(f(s) for s in st), 3)
        return {"steps": len(st), "step_ms": med(lambda s: s.seconds),
                "lookup_ms_per_layer": med(lambda s: s.lookup_s_per_layer),
                "host_wait_for_device_ms": med(lambda s: s.wait_s),
                "insert_core_ms_per_step": med(lambda s: s.insert_s)}


def concurrent_run(engine, prompts, att, max_tokens, tag, steady_steps=0, log: StepLog | None = None) -> dict:
    """len(prompts) requests submitted at once. Decode tokens/s counts the tokens that arrive while all of
    them are decoding (from the last first token to the first last token): the steady batched rate.
    steady_steps > 0: the requests run until every one has made that many tokens after the last one's
    first token, then they are aborted (long prompts: no wait for the first ones' max_tokens)."""
    rec = Recorder(engine)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        rec.submit(f"{tag}-{i}", ids, att, max_tokens)
    if steady_steps:
        rec.wait_steady(steady_steps)
        for rid in rec.times:
            engine.abort(rid)
    rec.wait()
    t1 = time.perf_counter()
    times = list(rec.times.values())
    assert all(times), f"a request made no token: {rec.finish}"
    lo, hi = max(t[0] for t in times), min(t[-1] for t in times)
    steady = sum(sum(1 for x in t if lo < x <= hi) for t in times)
    total = sum(len(t) for t in times)
    return {"requests": len(prompts), "finish": sorted(set(rec.finish.values())), "tokens": total,
            "wall_s": round(t1 - t0, 3), "e2e_tokens_per_s": round(total / (t1 - t0), 3),
            "decode_tokens_per_s": round(steady / (hi - lo), 3) if hi > lo and steady else None,
            "steady_window_s": round(hi - lo, 3),
            "ttft_s": [round(t[0] - rec.submitted[r], 3) for r, t in rec.times.items()],
            "step_split": log.split(lo, hi, len(prompts)) if log else None}


def sequential_run(engine, prompts, att, max_tokens, tag) -> dict:
    t0 = time.perf_counter()
    total, per = 0, []
    for i, ids in enumerate(prompts):
        rec = Recorder(engine)
        rec.submit(f"{tag}-{i}", ids, att, max_tokens)
        rec.wait()
        t = next(iter(rec.times.values()))
        total += len(t)
        per.append(round((t[-1] - t[0]) / max(len(t) - 1, 1) * 1e3, 2))
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "tokens": total, "wall_s": round(wall, 3),
            "e2e_tokens_per_s": round(total / wall, 3), "decode_ms_per_token": per}


def gap_run(engine, streams, long_ids, att, max_tokens) -> dict:
    """Streams decode; then a long prompt arrives. The largest gap between two tokens of any stream while
    the long prompt is prefilled (its submit -> its first token)."""
    rec = Recorder(engine)
    for i, ids in enumerate(streams):
        rec.submit(f"stream-{i}", ids, att, max_tokens)
    rec.wait_steady(8)
    t_sub = time.perf_counter()
    rec.submit("long", long_ids, att, 1)
    rec.wait_first("long")
    t_first = rec.times["long"][0]
    for i in range(len(streams)):
        engine.abort(f"stream-{i}")
    rec.wait()
    # a stream that ended by itself mid-prefill would leave the rest of it unsliced and unmeasured
    assert all(rec.finish[f"stream-{i}"] == "abort" for i in range(len(streams))), "raise --max-tokens"
    gaps, during = [], 0
    for i in range(len(streams)):
        t = rec.times[f"stream-{i}"]
        t = t[: bisect.bisect_right(t, t_first) + 1]  # up to the first token after the prefill: its gap counts
        seg = [b - a for a, b in zip(t, t[1:]) if b > t_sub]
        gaps += seg
        during += len(seg)
    return {"streams": len(streams), "long_prompt": len(long_ids), "long_ttft_s": round(t_first - t_sub, 3),
            "max_gap_s": round(max(gaps), 3) if gaps else None,
            "median_gap_s": round(statistics.median(gaps), 4) if gaps else None, "stream_tokens_during": during}


def doc_run(engine, doc, questions, att, max_tokens) -> dict:
    """One question after another on the same document: the first prefills it (cold), the others find it
    in the document cache. Time to first token of each, and the prompt tokens it reused."""
    runs = []
    for i, q in enumerate(questions):
        rec = Recorder(engine)
        rid = f"doc-{i}"
        rec.submit(rid, doc + q, att, max_tokens)
        rec.wait()
        runs.append({"prompt": len(doc) + len(q), "ttft_s": round(rec.times[rid][0] - rec.submitted[rid], 4),
                     "cached_tokens": rec.cached[rid], "finish": rec.finish[rid]})
    cold = runs[0]["ttft_s"]
    return {"document": len(doc), "questions": runs,
            "cached_over_cold": [round(r["ttft_s"] / cold, 4) for r in runs[1:]]}


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["concurrent"]
    c = [r["requests"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c, [r["decode_tokens_per_s"] or 0 for r in runs], "o-", label="decode tokens/s (all running)")
    ax.plot(c, [r["e2e_tokens_per_s"] for r in runs], "s--", label="end to end tokens/s (prefill included)")
    if report.get("sequential"):
        s = report["sequential"]
        ax.axhline(s["e2e_tokens_per_s"], color="gray", ls=":", label=f"{s['requests']} one at a time, end to end")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("tokens/s, all requests together")
    ax.set_title(f"{report['model']} {report['mode']}, {report['context']}-token prompts")
    ax.set_xticks(c)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_doc(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = report["doc"]
    t = [q["ttft_s"] for q in d["questions"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(range(len(t)), t, color=["tab:gray"] + ["tab:blue"] * (len(t) - 1))
    ax.set_xticks(range(len(t)), ["cold"] + [f"cached {i}" for i in range(1, len(t))])
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"{report['model']} {report['mode']}, {d['document']}-token document")
    for i, x in enumerate(t):
        ax.annotate(f"{x:.2f} s", (i, x), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-mem-gb", type=float, default=None, help="cap GPU memory (24: an RTX 4090)")
    ap.add_argument("--mode", default="retrieval")
    ap.add_argument("--context", type=int, default=1000, help="prompt tokens of each request")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steady-steps", type=int, default=0,
                    help="concurrent runs: stop each once every request has made this many tokens with all of "
                         "them decoding, then abort them (only decode tokens/s is meaningful; --max-tokens must cover the tokens the first "
                         "ones make while the last ones prefill)")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--sequential", type=int, default=0, help="also run this many requests one at a time")
    ap.add_argument("--gap-context", type=int, default=0, help="gap test: the long prompt's tokens (0: skip)")
    ap.add_argument("--gap-streams", type=int, default=2)
    ap.add_argument("--doc-context", type=int, default=0, help="document cache: the document's tokens (0: skip)")
    ap.add_argument("--doc-questions", type=int, default=3, help="document cache: questions asked on it in turn")
    ap.add_argument("--doc-cache-gb", type=float, default=None, help="document cache size (default: the engine's)")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--prefill-slice", type=float, default=0.25)
    ap.add_argument("--build-threads", type=int, default=0, help="index builds at once on CUDA (0: one per core)")
    ap.add_argument("--kv-store-dtype", default="float32", help="offloaded K/V in host memory: float32 | bf16 | int8")
    ap.add_argument("--out", default="bench/results/serving.json")
    a = ap.parse_args(argv)

    if a.gpu_mem_gb and a.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_mem_gb * 2**30 / total))
    max_len = max(a.context, a.gap_context, a.doc_context) + a.max_tokens + 64 if a.load_format == "dummy" else None
    log = StepLog()
    engine = Engine(EngineConfig(model=a.model, load_format=a.load_format, device=a.device,
                                 max_num_seqs=a.max_num_seqs, prefill_slice=a.prefill_slice, max_model_len=max_len,
                                 build_threads=a.build_threads, doc_cache_gb=a.doc_cache_gb), observer=log)
    att = AttentionConfig(mode=a.mode).override(dtype=a.kv_store_dtype)
    conc = [int(x) for x in a.concurrency.split(",") if x]
    seeds = itertools.count(1)

    def fresh(n: int, tokens: int = a.context) -> list[list[int]]:
        """Prompts no other run has sent: none reuses another's through the document cache."""
        return [prompt_ids(engine, tokens, next(seeds)) for _ in range(n)]

    # one short request first: compiles, caches and warms what the first measured run would otherwise pay
    concurrent_run(engine, [fresh(1)[0][:256]], att, 4, "warm")
    report = {"bench": "serving", "model": a.model, "load_format": a.load_format, "dtype": engine.config.dtype,
              "mode": a.mode, "kv_store_dtype": a.kv_store_dtype, "context": a.context,
              "max_tokens": a.max_tokens, "max_num_seqs": a.max_num_seqs,
              "prefill_slice": a.prefill_slice, "build_threads": a.build_threads,
              "doc_cache_bytes": engine.doc_cache.budget if engine.doc_cache else 0,
              "command": "python bench/serving.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "env": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                      "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
                      "gpu_mem_cap_gb": a.gpu_mem_gb},
              "concurrent": []}
    for c in conc:
        r = concurrent_run(engine, fresh(c), att, a.max_tokens, f"c{c}", a.steady_steps, log)
        print(json.dumps(r), flush=True)
        report["concurrent"].append(r)
    one = next((r for r in report["concurrent"] if r["requests"] == 1), None)
    if one and one["decode_tokens_per_s"]:
        report["decode_speedup"] = {r["requests"]: round(r["decode_tokens_per_s"] / one["decode_tokens_per_s"], 2)
                                    for r in report["concurrent"] if r["decode_tokens_per_s"]}
    if a.sequential:
        s = sequential_run(engine, fresh(a.sequential), att, a.max_tokens, "seq")
        report["sequential"] = s
        same = next((r for r in report["concurrent"] if r["requests"] == a.sequential), None)
        if same:
            report["concurrent_over_sequential"] = round(same["e2e_tokens_per_s"] / s["e2e_tokens_per_s"], 2)
        print(json.dumps(s), flush=True)
    if a.gap_context:
        long_ids = prompt_ids(engine, a.gap_context, 99)
        streams = [p[: min(len(p), 1024)] for p in fresh(a.gap_streams)]
        report["gap"] = gap_run(engine, streams, long_ids, att, a.max_tokens)
        print(json.dumps(report["gap"]), flush=True)
    if a.doc_context:
        ids = prompt_ids(engine, a.doc_context, 123)
        doc, q = ids[:-32], ids[-32:]  # the document, then its question (and the chat's assistant header)
        g = torch.Generator().manual_seed(5)
        # the other questions: the same ending with other first tokens, so the prompts part where they begin
        questions = [q] + [torch.randint(100, 1000, (4,), generator=g).tolist() + q[4:]
                           for _ in range(a.doc_questions - 1)]
        report["doc"] = doc_run(engine, doc, questions, att, 8)
        print(json.dumps(report["doc"]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if report["concurrent"]:
        plot(report, out.with_suffix(".png"))
    elif report.get("doc"):
        plot_doc(report, out.with_suffix(".png"))
    print("wrote", out, json.dumps({k: report.get(k) for k in ("decode_speedup", "concurrent_over_sequential")}))
    engine.shutdown()


if __name__ == "__main__":
    main()
