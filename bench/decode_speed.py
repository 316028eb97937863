"""Per-token decode latency, prefill time (TTFT incl. index build) and memory of every attention mode,
side by side in one run, plus the exactness check: `flat` with top_k = all gives `full`'s greedy tokens.

CPU, embedded model, a real 3.5K-token prompt:
    python bench/decode_speed.py --context 3500 --out bench/results/decode_speed_cpu.json
GPU machine, Llama-3-8B shape with random bf16 weights, 24 GB card emulated:
    python bench/decode_speed.py --model llama-3-8b --load-format dummy --device cuda --context 32768 \
        --gpu-mem-gb 24 --out bench/results/decode_speed_h200_32k.json
Decode at 1M tokens beside 128K in one run, with an int8 store and the benchmark-only local prefill
(attention restricted to --local-window keys back, so that its cost is linear in the prompt; the K/V,
build queries, stores and index come from the normal path):
    python bench/decode_speed.py --model llama-3.1-8b --load-format dummy --device cuda --gpu-mem-gb 24 \
        --context 131072,1048576 --prefill-attention local --kv-store-dtype int8 --modes retrieval
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.attention import MODES, AttentionConfig  # noqa: E402
from engine.kv import SequenceKV  # noqa: E402
from engine.llm_engine import Engine, EngineConfig  # noqa: E402

ALL = 10**9


def prompt_ids(engine: Engine, n: int, seed: int) -> list[int]:
    if engine.tokenizer is not None:
        from bench.tasks import passkey

        return engine.encode_chat(passkey(engine.tokenizer, n, seed).messages)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, engine.shape.vocab_size - 100, (n,), generator=g).tolist()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def profile_steps(engine: Engine, kv: SequenceKV, tokens: list[int], pos: int, top_k: int, n: int) -> dict:
    """n more decode steps under torch.profiler: the device's busy time per step (kernels and copies),
    launches per step and the costliest kernels, so that host overhead shows as step time minus the rest."""
    with _device_profile(True) as prof:
        for i in range(n):
            logits = engine.runner.decode(tokens[-1], pos + i, kv, top_k)
            tokens.append(int(torch.argmax(logits)))
    return _device_summary(prof, n)


def _device_profile(on: bool):
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if on else nullcontext()


def _device_summary(prof, n: int) -> dict:
    """The device's busy time per step (kernels and copies), its ops per step and the costliest ones; the
    host ops with the most time of their own (launch and dispatch overhead, under the profiler's own)."""
    from torch.autograd import DeviceType

    dev = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.self_device_time_total for e in dev)
    top = sorted(dev, key=lambda e: -e.self_device_time_total)[:12]
    return {"steps": n, "device_busy_ms_per_step": round(busy_us / n / 1e3, 3),
            "device_ops_per_step": round(sum(e.count for e in dev) / n, 1),
            "top_device_ops": [{"name": e.key[:80], "ms_per_step": round(e.self_device_time_total / n / 1e3, 3),
                                "calls_per_step": round(e.count / n, 1)} for e in top],
            "top_host_ops": [{"name": e.key[:80], "self_ms_per_step": round(e.self_cpu_time_total / n / 1e3, 3),
                              "calls_per_step": round(e.count / n, 1)}
                             for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]]}


def lookup_profile(engine: Engine, kv: SequenceKV, token: int, pos: int, top_k: int, reps: int = 20) -> dict:
    """One more step, whose CPU lookups record their calls; then a few layers' calls replayed alone for
    several numba thread counts, with the keys each head's own walk would scan: is a layer's CPU part work
    or overhead?"""
    import numba

    from engine import model_runner
    from index.kernels import R_ROW

    calls = {}
    real = model_runner.attend_batch

    def spy(desc, l, req, G, scale, q, *a, **kw):
        calls[l] = (desc, req, G, scale, q.copy(), a, kw)
        return real(desc, l, req, G, scale, q, *a, **kw)

    model_runner.attend_batch = spy
    try:
        engine.runner.decode(token, pos, kv, top_k)
    finally:
        model_runner.attend_batch = real
    top = numba.get_num_threads()
    out = {"numba_threading_layer": numba.threading_layer(), "layers": []}
    for l in sorted({0, engine.shape.n_layers // 2, engine.shape.n_layers - 1}):
        desc, req, G, scale, q, a, kw = calls[l]
        store = kv.stores[l]
        _, scanned = store.search(q[req[0, R_ROW]], top_k, kv.cur_occ)
        row = {"layer": l, "keys": store.n, "scanned_per_head_mean": round(float(scanned.mean()), 1),
               "scanned_per_head_max": int(scanned.max()), "ms_by_threads": {}}
        for t in sorted({1, 2, 4, 8, top}):
            numba.set_num_threads(min(t, top))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                real(desc, l, req, G, scale, q, *a, **kw)
                times.append(time.perf_counter() - t0)
            row["ms_by_threads"][t] = round(1e3 * statistics.median(times), 4)
        numba.set_num_threads(top)
        out["layers"].append(row)
    return out


def run_mode(engine: Engine, ids: list[int], att: AttentionConfig, steps: int, profile: int = 0,
             graphs: bool = True, profile_lookups: bool = False, profile_prefill: bool = False) -> dict:
    import gc

    gc.collect()  # the last mode's stores are gone before this one's fill host memory
    dev = engine.device
    engine.runner.use_graphs = graphs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    kv = None
    try:
        kv = SequenceKV(engine.shape, att, len(ids) + steps, dev, engine.model.dtype, engine.copy_scores,
                        engine.pools)
        sync(dev)
        t0 = time.perf_counter()
        last = [t0]

        def progress(l: int):  # a long prefill shows where it is (a run cut short says how far it got)
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                print(f"  {att.mode} {len(ids)}: layer {l + 1} after {last[0] - t0:.0f} s", file=sys.stderr, flush=True)

        prof = _device_profile(profile_prefill and dev.type == "cuda")
        with prof:
            logits, stats = engine.runner.prefill(ids, kv, on_layer=progress)
            sync(dev)
        ttft = time.perf_counter() - t0
        tokens, lat, retr, host, wait = [int(torch.argmax(logits))], [], [], [], []
        for i in range(steps):
            t = time.perf_counter()
            logits = engine.runner.decode(tokens[-1], len(ids) + i, kv, att.top_k)
            host.append(time.perf_counter() - t)  # the host's part: launches, CPU retrieval, waits inside
            tokens.append(int(torch.argmax(logits)))  # syncs: the step is complete
            lat.append(time.perf_counter() - t)
            retr.append(kv.take_retrieval_seconds())
            wait.append(engine.runner.take_wait_seconds())
        warm = lat[2:] if len(lat) > 4 else lat  # first steps include lazy allocations / JIT loads
        lat_sorted = sorted(warm)

        def med_ms(xs):
            return round(1e3 * statistics.median(xs[2:] if len(xs) > 4 else xs), 3)

        n_cpu = sum(1 for st in kv.stores or [] if st.n > 0)
        out = {
            "mode": att.mode, "top_k": att.top_k, "status": "ok", "prompt_tokens": len(ids),
            "kv_store_dtype": att.index.dtype if att.store_kind else None,
            "cuda_graphs": graphs and (bool(engine.runner._full_graphs) if kv.pool is None
                                       else engine.pools.fixed is not None and kv.pool is engine.pools.fixed),
            "copy_threshold": att.copy_threshold, "exact_heads": int(sum(s.exact.sum() for s in kv.stores or [])),
            "ttft_s": round(ttft, 4), "prefill_compute_s": round(stats.compute_s, 4),
            "index_wait_s": round(stats.index_wait_s, 4), "index_build_s_sum": round(stats.build_s, 4),
            "copy_wait_s": round(stats.copy_wait_s, 4),
            "offloaded_tokens": stats.offloaded,
            "decode_ms_median": round(1e3 * statistics.median(warm), 3),
            "decode_ms_mean": round(1e3 * statistics.mean(warm), 3),  # with the steps that evict a block
            "decode_ms_p90": round(1e3 * lat_sorted[int(0.9 * (len(lat_sorted) - 1))], 3),
            "retrieval_ms_per_layer_median": round(1e3 * statistics.median(retr[2:] or retr), 4),
            # the split of a step: the host returns from decode() after host_ms (CPU retrieval and waits for
            # the device included); the rest of the step is the device finishing what was queued
            "split": {"host_ms": med_ms(host), "cpu_retrieval_ms": round(med_ms(retr) * n_cpu, 3),
                      "host_wait_for_device_ms": med_ms(wait), "device_tail_ms": round(med_ms(lat) - med_ms(host), 3),
                      "layers_with_cpu_part": n_cpu},
            "cpu_store_bytes": kv.cpu_bytes(), "host_rss_gb": round(_rss_bytes() / 2**30, 2), "tokens": tokens,
        }
        if profile_lookups and kv.stores is not None and kv.n_offloaded:
            out["lookup_profile"] = lookup_profile(engine, kv, tokens[-1], len(ids) + steps, att.top_k)
        if profile_prefill and dev.type == "cuda":
            out["prefill_profile"] = _device_summary(prof, 1)  # (its wall time is the TTFT, profiler included)
        if profile and dev.type == "cuda":
            try:
                out["profile"] = profile_steps(engine, kv, tokens, len(ids) + steps, att.top_k, profile)
            except Exception as e:  # a profiler problem must not cost the run's other figures
                out["profile"] = {"error": f"{type(e).__name__}: {e}"}
        if dev.type == "cuda":
            out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        return out
    except torch.OutOfMemoryError as e:
        return {"mode": att.mode, "top_k": att.top_k, "status": "oom", "prompt_tokens": len(ids),
                "error": str(e).splitlines()[0]}
    finally:
        if kv is not None:
            kv.free()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--context", default="3500", help="prompt tokens; a comma-separated list runs each in turn")
    ap.add_argument("--prefill-attention", choices=("full", "local"), default="full",
                    help="local: benchmark-only prefill whose attention reaches --local-window keys back")
    ap.add_argument("--local-window", type=int, default=4096)
    ap.add_argument("--kv-store-dtype", default=None, help="every mode's CPU store dtype (default: the engine's)")
    ap.add_argument("--admission", default="",
                    help="comma-separated context:dtype pairs: does the engine admit a retrieval request of that "
                         "prompt (and --steps tokens) within its default host budget? e.g. 1048576:bf16")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--copy-thresholds", default="0.1",
                    help="retrieval runs once per value; 0 flags every head as copying (the worst case: dummy "
                         "weights have no copying heads)")
    ap.add_argument("--graph", default="",
                    help="retrieval: ';'-separated variants of graph settings, each 'name=value,...' over "
                         "the defaults (ef, degree, knn, query_stride, max_queries, dtype), e.g. ';dtype=bf16'")
    ap.add_argument("--gpu-mem-gb", type=float, default=None, help="cap GPU memory (24: an RTX 4090)")
    ap.add_argument("--check-exact", action=argparse.BooleanOptionalAction, default=True,
                    help="also run flat with top_k = all and compare its greedy tokens with full")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="CUDA: this many more steps per mode under torch.profiler (device busy time, top kernels)")
    ap.add_argument("--profile-lookups", action="store_true",
                    help="time a few layers' CPU lookups alone by numba thread count, with keys scanned per head")
    ap.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="on",
                    help="CUDA: decode steps replay captured graphs, run eagerly, or each mode both ways")
    ap.add_argument("--compile", choices=("on", "off"), default="on",
                    help="CUDA: torch.compile's fused kernels (the engine's default) or eager ops")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="CUDA: each mode's prefill under torch.profiler: device busy time and the costliest ops")
    ap.add_argument("--full-graph-layers", default="",
                    help="CUDA: `full` runs once per value, its step captured anew in graphs of that many layers")
    ap.add_argument("--out", default="bench/results/decode_speed.json")
    a = ap.parse_args(argv)

    if a.gpu_mem_gb and a.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_mem_gb * 2**30 / total))
    contexts = [int(x) for x in a.context.split(",")]
    t = time.perf_counter()
    admission = [(int(n), dt) for n, dt in (x.split(":") for x in a.admission.split(",") if x)]
    engine = Engine(EngineConfig(model=a.model, load_format=a.load_format, device=a.device, dtype=a.dtype,
                                 max_num_seqs=1, cuda_graphs=a.cuda_graphs != "off", compile=a.compile == "on",
                                 max_model_len=max(contexts + [n for n, _ in admission]) + a.steps + 64))
    engine.plan_prefill()  # this thread prefills here, not the engine's (cuDNN keeps its plans per thread)
    load_s = time.perf_counter() - t
    if a.prefill_attention == "local":
        engine.runner.prefill_window = a.local_window
    base = engine.config.attention.override(dtype=a.kv_store_dtype)
    admitted = []
    for n, dt in admission:  # the engine's own check, as a request would meet it (nothing runs)
        try:
            need = engine.admit_host_bytes(n, a.steps, base.override(mode="retrieval", dtype=dt))
            admitted.append({"context": n, "kv_store_dtype": dt, "admitted": True, "host_bytes": need})
        except ValueError as e:
            admitted.append({"context": n, "kv_store_dtype": dt, "admitted": False, "error": str(e)})
        admitted[-1]["budget_bytes"] = engine.cpu_kv_budget
        print(json.dumps(admitted[-1]), flush=True)
    results, exact = [], []
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu",
           "gpu_mem_cap_gb": a.gpu_mem_gb}
    report = {"bench": "decode_speed", "model": a.model, "load_format": a.load_format, "dtype": engine.config.dtype,
              "synthetic": "random weights and random prompt tokens" if engine.tokenizer is None else False,
              "contexts": contexts, "steps": a.steps, "load_s": round(load_s, 2), "compile": a.compile, "env": env,
              "prefill_attention": a.prefill_attention if a.prefill_attention == "full" else
              f"local ({a.local_window} keys back; benchmark-only)", "admission": admitted,
              "command": "python bench/decode_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "modes": results, "exactness": exact}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every result: a run cut short keeps what it measured
        Path(a.out).write_text(json.dumps(report, indent=1))

    variants = [{k: int(x) if x.isdigit() else x for k, x in (kv.split("=") for kv in v.split(",") if kv)}
                for v in a.graph.split(";")]
    for n_ctx in contexts:
        ids = prompt_ids(engine, n_ctx, 0)
        for mode in a.modes.split(","):
            retrieval = mode == "retrieval"
            for ct in [float(x) for x in a.copy_thresholds.split(",")] if retrieval else [0.1]:
                for graph in variants if retrieval else [{}]:
                    att = base.override(mode=mode, top_k=a.top_k, copy_threshold=ct, **graph)
                    pieces = [int(x) for x in a.full_graph_layers.split(",") if x] if mode == "full" else []
                    for graphs, layers in [(g, n) for g in {"on": [True], "off": [False], "both": [True, False]}[
                            a.cuda_graphs] for n in (pieces if g and pieces else [None])]:
                        if layers is not None:
                            if not engine.runner._full_graphs:
                                raise SystemExit("--full-graph-layers: this engine captured no `full` graphs")
                            engine.runner.capture_full_graphs(sorted(engine.runner._full_graphs), layers)
                        r = run_mode(engine, ids, att, a.steps, a.profile_steps, graphs, a.profile_lookups,
                                     a.profile_prefill)
                        if layers is not None:
                            r["full_graph_layers"] = layers
                            if layers == pieces[-1]:  # the engine's own graphs again, for what runs next
                                engine.runner.capture_full_graphs(sorted(engine.runner._full_graphs))
                        if retrieval:
                            r["graph"] = {"ef": att.index.ef, "degree": att.index.degree, "knn": att.index.knn,
                                          "queries_per_head": att.graph_queries(len(ids))}
                        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
                        results.append(r)
                        save()
        if a.check_exact:
            ran = [r for r in results if r["prompt_tokens"] == len(ids)]
            flat_all = run_mode(engine, ids, base.override(mode="flat", top_k=ALL, dtype="float32"), min(a.steps, 16))
            full = next((r for r in ran if r["mode"] == "full" and r["status"] == "ok"), None)
            if full is None:  # full did not run or fit the cap: compare without it
                full = run_mode(engine, ids, AttentionConfig(mode="full"), min(a.steps, 16))
            n = min(len(flat_all.get("tokens", [])), len(full.get("tokens", [])))
            exact.append({"context": len(ids), "flat_all_tokens": flat_all.get("tokens"),
                          "full_tokens": full.get("tokens"),
                          "same_greedy_tokens": n > 0 and flat_all["tokens"][:n] == full["tokens"][:n],
                          "compared": n, "flat_all_decode_ms_median": flat_all.get("decode_ms_median")})
            print(json.dumps({k: v for k, v in exact[-1].items() if "tokens" not in k or k == "same_greedy_tokens"}))
            save()
    save()
    print("wrote", a.out)
    engine.shutdown()


if __name__ == "__main__":
    main()
