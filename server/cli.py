"""`rattn serve` (the OpenAI-compatible server) and `rattn generate` (a quick trial on the engine)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import tomllib
from pathlib import Path

from engine.attention import MODES, AttentionConfig
from engine.loader import EMBEDDED

# flag -> (type, default, help); shared by serve and generate, and the keys a --config preset may set
ENGINE_FLAGS = {
    "model": (str, EMBEDDED, "model: the embedded default, gemma-3-270m, a checkpoint directory, a .gguf file, or "
                             "with --load-format dummy a shape from configs/models"),
    "load_format": (str, "auto", "auto | dummy (random weights of the --model shape)"),
    "device": (str, "auto", "auto | cpu | cuda | cuda:N"),
    "dtype": (str, "auto", "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16"),
    "attention": (str, "retrieval", f"attention mode: {' | '.join(MODES)}"),
    "retrieve_k": (int, 100, "keys retrieved per head and decode step from the CPU store (not sampling's top_k)"),
    "sink": (int, 128, "first tokens kept on the device"),
    "window": (int, 512, "last tokens kept on the device"),
    "ef": (int, 128, "index search list size"),
    "kv_store_dtype": (str, "auto", "offloaded K/V in host memory: auto (bf16 for a bfloat16 model, as on CUDA: "
                                    "its K/V lose nothing; else float32) | float32 | bf16 (half the bytes) | int8 "
                                    "(a quarter, plus a scale per token and KV head); flat and graph stores, "
                                    "hnswlib's stays float32"),
    "graph_degree": (int, 24, "graph index: edges per key (memory: 4 bytes each per key and KV head)"),
    "graph_knn": (int, 64, "graph index: exact top keys of each prefill query that shape the graph"),
    "graph_query_stride": (int, 32, "graph index: one prefill query per head shapes it for every this many "
                                    "prompt tokens"),
    "graph_queries": (int, 2048, "graph index: at most this many prefill queries per head"),
    "copy_threshold": (float, 0.1, "retrieval: heads whose copy score reaches this scan their offloaded keys "
                                   "exactly (above 1: none)"),
    "max_model_len": (int, None, "context limit (default: the model's)"),
    "cpu_threads": (int, 0, "CPU threads of the retrieval step (0: all cores)"),
    "request_timeout": (float, 0.0, "seconds a request may take from when the engine queues it to its last token "
                                    "(0: no limit); "
                                    "past it, it ends with finish_reason 'length', even before its first token"),
    "max_num_seqs": (int, 8, "requests that run at once and share each decode step (more wait in the queue)"),
    "prefill_slice": (float, 0.25, "seconds of a new request's prefill between two decode steps of the running "
                                   "requests (their largest gap between tokens while a long prompt is prefilled)"),
    "cpu_kv_budget": (float, None, "GiB of host memory the running requests' offloaded K/V and indexes and the "
                                   "document cache may take together (default: what is available at start, less a "
                                   "tenth); a request that can never fit gets a 400, one that fits later waits in "
                                   "the queue (unused cache entries are evicted for it)"),
    "doc_cache_gb": (float, None, "GiB of --cpu-kv-budget the document cache may take: prompts of 1,024 tokens or "
                                  "more stay prefilled and indexed, and a later prompt that begins with at least "
                                  "half of one prefills only the rest (default: a quarter of --cpu-kv-budget; 0: "
                                  "off)"),
    "cuda_graphs": (int, 1, "CUDA: decode steps replay CUDA graphs captured at start (0: eager, every op launched "
                            "from Python)"),
    "compile": (int, 1, "CUDA: torch.compile fuses the elementwise work around the matmuls, at start (0: off; "
                        "starts sooner, decodes slower)"),
    "stall_timeout": (float, 120.0, "when the engine makes no progress (a layer, a token) for this many seconds, "
                                   "/health and the requests waiting on it answer 503"),
}
SERVE_FLAGS = {
    "host": (str, "127.0.0.1", "address to listen on"),
    "port": (int, 8000, "port"),
    "api_key": (str, None, "require 'Authorization: Bearer KEY' on /v1 routes, /tokenize and /detokenize"),
    "max_queue": (int, 64, "requests waiting for the engine before 429"),
    "served_model_name": (str, None, "model id clients send (default: --model)"),
    "max_request_mb": (float, 8.0, "request body limit in MiB (413 above it; a 1M-token prompt is ~4 MiB of text)"),
    "sse_keepalive": (float, 15.0, "seconds between ': keep-alive' comments on a quiet stream (queued, prefilling)"),
    "shutdown_timeout": (float, 30.0, "on SIGTERM/SIGINT: seconds running requests may still run before they are "
                                      "aborted"),
    "allowed_origins": (str, None, "CORS: comma-separated origins allowed to call the API from a browser ('*': any)"),
    "default_max_tokens": (int, 4096, "a chat request that sets no max_tokens generates at most this many (0: as many "
                                      "as the context and --cpu-kv-budget hold; admission reserves that much)"),
}


def load_preset(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        alt = Path(__file__).resolve().parent.parent / "configs" / "presets" / p.name
        if not alt.is_file():
            raise SystemExit(f"rattn: config file not found: {path}")
        p = alt
    if p.suffix == ".toml":
        data = tomllib.loads(p.read_text())
    else:
        import yaml

        data = yaml.safe_load(p.read_text()) or {}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = set(ENGINE_FLAGS) | set(SERVE_FLAGS)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SystemExit(f"rattn: unknown keys in {path}: {', '.join(unknown)}")
    return data


def add_flags(ap: argparse.ArgumentParser, flags: dict):
    for name, (typ, _default, help_) in flags.items():
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)


def resolve_args(ns: argparse.Namespace, flags: dict) -> dict:
    """Defaults < --config preset (or RATTN_CONFIG) < RATTN_<FLAG> environment variables < flags."""
    out = {k: d for k, (_, d, _) in flags.items()}
    preset = getattr(ns, "config", None) or os.environ.get("RATTN_CONFIG")
    if preset:
        out.update({k: v for k, v in load_preset(preset).items() if k in flags})
    for k, (typ, _, _) in flags.items():
        env = os.environ.get("RATTN_" + k.upper())
        if env:
            try:
                out[k] = typ(env)
            except ValueError:
                raise SystemExit(f"rattn: RATTN_{k.upper()}={env!r} is not a valid {typ.__name__}") from None
    out.update({k: v for k, v in vars(ns).items() if k in flags and v is not None})
    return out


def engine_config(a: dict):
    from engine.llm_engine import EngineConfig

    att = AttentionConfig(mode=a["attention"], top_k=a["retrieve_k"], sink=a["sink"], window=a["window"],
                          max_queries=a["graph_queries"], query_stride=a["graph_query_stride"],
                          copy_threshold=a["copy_threshold"])
    store = a["kv_store_dtype"]
    att = att.override(ef=a["ef"], degree=a["graph_degree"], knn=a["graph_knn"],
                       dtype=None if store == "auto" else store)
    cfg = EngineConfig(model=a["model"], load_format=a["load_format"], device=a["device"], dtype=a["dtype"],
                       attention=att, max_model_len=a["max_model_len"], max_queue=a.get("max_queue", 64),
                       cpu_threads=a["cpu_threads"], request_timeout=a["request_timeout"],
                       stall_timeout=a["stall_timeout"], max_num_seqs=a["max_num_seqs"],
                       prefill_slice=a["prefill_slice"], cuda_graphs=bool(a["cuda_graphs"]), compile=bool(a["compile"]),
                       cpu_kv_budget_gb=a["cpu_kv_budget"], doc_cache_gb=a["doc_cache_gb"])
    if store == "auto":  # the device and dtype are resolved now
        cfg.attention = cfg.attention.override(dtype="bf16" if cfg.dtype == "bfloat16" else "float32")
    return cfg


def cmd_serve(ns):
    from server.api_server import ServerConfig, serve

    a = resolve_args(ns, {**ENGINE_FLAGS, **SERVE_FLAGS})
    origins = [o.strip() for o in (a["allowed_origins"] or "").split(",") if o.strip()]
    cfg = ServerConfig(engine=engine_config(a), served_model_name=a["served_model_name"], api_key=a["api_key"],
                       max_request_mb=a["max_request_mb"], sse_keepalive=a["sse_keepalive"],
                       shutdown_timeout=a["shutdown_timeout"], allowed_origins=origins,
                       default_max_tokens=a["default_max_tokens"])
    serve(cfg, a["host"], a["port"])


def cmd_generate(ns):
    from engine.llm_engine import Engine
    from engine.sampling import SamplingParams
    from engine.sequence import Request

    a = resolve_args(ns, ENGINE_FLAGS)
    eng = Engine(engine_config(a))
    prompt = Path(ns.prompt_file).read_text() if ns.prompt_file else ns.prompt
    if prompt is None:
        raise SystemExit("rattn generate: give --prompt or --prompt-file")
    ids = eng.encode_chat([{"role": "user", "content": prompt}]) if ns.chat else eng.encode(prompt)
    sp = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, seed=ns.seed)
    t = time.perf_counter()
    first = None
    for out in eng.stream(Request(ids, sp)):
        first = first or time.perf_counter()
        sys.stdout.write(out.text)
        sys.stdout.flush()
        if out.finish_reason:
            if out.error:
                raise SystemExit(f"\nrattn: {out.error}")
            n = out.num_generated
            print(f"\n[{out.finish_reason}] prompt {len(ids)} tokens, {n} generated, first token after "
                  f"{first - t:.2f}s, {max(n - 1, 0) / max(time.perf_counter() - first, 1e-9):.2f} tok/s",
                  file=sys.stderr)
    eng.shutdown()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="rattn", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    add_flags(s, {**ENGINE_FLAGS, **SERVE_FLAGS})
    s.add_argument("--config", help="YAML or TOML preset (keys as the flags; flags win)")
    g = sub.add_parser("generate", help="generate once from a prompt")
    add_flags(g, ENGINE_FLAGS)
    g.add_argument("--config", help="YAML or TOML preset")
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    e = sub.add_parser("eval", help="the fidelity benchmark (bench/accuracy.py; needs a source checkout)",
                       add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv)
    if ns.cmd == "eval":
        root = Path(__file__).resolve().parent.parent
        if not (root / "bench" / "accuracy.py").is_file():
            raise SystemExit("rattn eval: bench/ is not here; run it from a source checkout")
        sys.path.insert(0, str(root))
        from bench.accuracy import main as accuracy_main

        return accuracy_main(ns.rest)
    from engine.logging_context import configure

    configure(logging.INFO)
    try:
        {"serve": cmd_serve, "generate": cmd_generate}[ns.cmd](ns)
    except (ValueError, OSError) as e:
        raise SystemExit(f"rattn: {e}") from None


if __name__ == "__main__":
    main()
