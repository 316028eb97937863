"""What the HTTP layer adds: time to first token and decode tokens/s through a live server (streaming,
the openai SDK) against the engine called directly, same prompt, same greedy generation.

    python bench/http_overhead.py --out bench/results/http_overhead.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import openai  # noqa: E402

from bench.tasks import passkey  # noqa: E402
from engine.llm_engine import Engine, EngineConfig  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.sequence import Request  # noqa: E402
from server_util import live_server  # noqa: E402

MODEL = "smollm2-135m-instruct"


def direct(engine: Engine, ids: list[int], n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    for _ in engine.stream(Request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))):
        first = first or time.perf_counter()
    return first - t0, (n - 1) / (time.perf_counter() - first)


def http(client: openai.OpenAI, messages: list[dict], n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    first, count = None, 0
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content is not None and chunk.choices[0].delta.content != "":
            first = first or time.perf_counter()
            count += 1
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/http_overhead.json")
    a = ap.parse_args(argv)
    engine = Engine(EngineConfig(device="cpu"))
    messages = passkey(engine.tokenizer, a.prompt_tokens, 1).messages
    ids = engine.encode_chat(messages)
    direct(engine, ids, 4)  # warm-up (JIT, allocator)
    d = [direct(engine, ids, a.new_tokens) for _ in range(a.repeats)]
    engine.shutdown()
    del engine
    with live_server() as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        http(client, messages, 4)
        h = [http(client, messages, a.new_tokens) for _ in range(a.repeats)]
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    report = {"bench": "http_overhead", "model": MODEL, "prompt_tokens": len(ids), "new_tokens": a.new_tokens,
              "repeats": a.repeats, "attention": "retrieval (defaults)",
              "direct": {"ttft_s": round(med(d, 0), 4), "tokens_per_s": round(med(d, 1), 2)},
              "http": {"ttft_s": round(med(h, 0), 4), "tokens_per_s": round(med(h, 1), 2)},
              "command": "python bench/http_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    report["ttft_overhead_pct"] = round(100 * (report["http"]["ttft_s"] / report["direct"]["ttft_s"] - 1), 2)
    report["throughput_overhead_pct"] = round(100 * (1 - report["http"]["tokens_per_s"] /
                                                     report["direct"]["tokens_per_s"]), 2)
    print(json.dumps(report, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
