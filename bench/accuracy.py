"""Fidelity: RULER-style tasks, every attention mode side by side on the same prefill.

Each sample is prefilled once into one SequenceKV per configuration (the engine's fork), then
decoded greedily under each. Per cell: accuracy. Per configuration: mean relative error of the
attention outputs against `full` (every layer, at the decode steps whose token prefix still equals
full's), decode tokens/s.

    python bench/accuracy.py --lengths 1024,2048,4096,8192 --samples 12     # the full run (hours on 2 cores)
    rattn eval --lengths 1024,2048 --samples 3                               # the same, through the CLI
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.tasks import TASKS  # noqa: E402
from engine.attention import AttentionConfig  # noqa: E402
from engine.kv import SequenceKV  # noqa: E402
from engine.llm_engine import Engine, EngineConfig  # noqa: E402

# the chat model restates the question before answering: budgets measured on its full-attention answers
MAX_NEW = {"passkey": 12, "niah_single_number": 24, "niah_single_word": 24, "niah_single_uuid": 44,
           "niah_multikey": 24, "niah_multivalue": 56, "variable_tracking": 40}


@dataclass
class Run:
    name: str
    att: AttentionConfig


def configs(top_k: int, sweep: list[int], exact: bool) -> list[Run]:
    runs = [Run("full", AttentionConfig(mode="full"))]
    runs += [Run(m, AttentionConfig(mode=m, top_k=top_k)) for m in ("streaming", "flat", "hnsw", "retrieval")]
    runs += [Run(f"retrieval@{k}", AttentionConfig(mode="retrieval", top_k=k)) for k in sweep if k != top_k]
    if exact:
        runs.append(Run("flat@all", AttentionConfig(mode="flat", top_k=10**9)))
    return runs


def run_sample(engine: Engine, ids: list[int], runs: list[Run], max_new: int) -> dict:
    """-> {run name: {"text", "tokens", "decode_s", "rel_err" (list)}}; full must be runs[0]."""
    kvs = [SequenceKV(engine.shape, r.att, len(ids) + max_new, engine.device, engine.model.dtype) for r in runs]
    logits0, _ = engine.runner.prefill_many(ids, kvs)
    eos = engine.eos_ids
    out, full_attn, full_tokens = {}, [], []
    for r, kv in zip(runs, kvs):
        tokens, errs, logits = [], [], logits0
        t = time.perf_counter()
        for i in range(max_new):
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            if tok in eos or i == max_new - 1:
                break
            same_prefix = r.name != "full" and tokens == full_tokens[: len(tokens)] and i < len(full_attn)
            step = []
            logits = engine.runner.decode(tok, len(ids) + i, kv, r.att.top_k,
                                          capture=lambda l, o: step.append(o.float().clone()))
            if r.name == "full":
                full_attn.append(step)
            elif same_prefix:
                errs += [float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
                         for a, b in zip(step, full_attn[i])]
        dt = time.perf_counter() - t
        if r.name == "full":
            full_tokens = tokens
        out[r.name] = {"text": engine.tokenizer.decode(tokens, skip_special_tokens=True), "tokens": tokens,
                       "decode_s": dt, "rel_err": errs}
        kv.free()
    return out


def evaluate(engine: Engine, tasks: list[str], lengths: list[int], samples: int, runs: list[Run], log=print) -> dict:
    cells = defaultdict(lambda: [0, 0])  # (task, length, run) -> [correct, total]
    errs, decode = defaultdict(list), defaultdict(lambda: [0.0, 0])
    records = []
    for length in lengths:
        for task in tasks:
            for s in range(samples):
                sample = TASKS[task](engine.tokenizer, length, seed=10_000 * length + s)
                ids = engine.encode_chat(sample.messages)
                res = run_sample(engine, ids, runs, MAX_NEW[task])
                rec = {"task": task, "length": length, "seed": s, "prompt_tokens": len(ids),
                       "answers": sample.answers, "outputs": {}}
                for name, r in res.items():
                    ok = sample.correct(r["text"])
                    cells[(task, length, name)][0] += ok
                    cells[(task, length, name)][1] += 1
                    errs[name] += r["rel_err"]
                    decode[name][0] += r["decode_s"]
                    decode[name][1] += max(len(r["tokens"]) - 1, 0)
                    rec["outputs"][name] = {"text": r["text"], "correct": ok}
                records.append(rec)
                log(json.dumps({"task": task, "length": length, "seed": s, "tokens": len(ids),
                                **{n: o["correct"] for n, o in rec["outputs"].items()}}))
    names = [r.name for r in runs]
    table = [{"task": t, "length": L, "run": n, "correct": c[0], "total": c[1], "accuracy": round(100 * c[0] / c[1], 1)}
             for (t, L, n), c in cells.items()]
    per_run = {n: {"mean_rel_err_attention": (round(sum(errs[n]) / len(errs[n]), 5) if errs[n] else None),
                   "decode_tokens_per_s": round(decode[n][1] / decode[n][0], 2) if decode[n][0] else None}
               for n in names}
    avg = {(L, n): round(sum(r["accuracy"] for r in table if r["length"] == L and r["run"] == n) / len(tasks), 1)
           for L in lengths for n in names}
    return {"cells": table, "per_run": per_run,
            "average_by_length": [{"length": L, "run": n, "accuracy": a} for (L, n), a in avg.items()],
            "samples": records}


def markdown(report: dict) -> str:
    names = list(report["per_run"])
    lines = ["# Accuracy: RULER-style tasks, every attention mode on the same prefill", "",
             f"Command: `{report['command']}`  ", f"Model: {report['model']}, {report['samples_per_cell']} samples "
             f"per cell, top_k {report['top_k']}, sink 128, window 512, greedy. Machine: {report['machine']}; "
             f"wall time {report['wall_s']:.0f} s.", "",
             "| task | length | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    acc = {(c["task"], c["length"], c["run"]): c["accuracy"] for c in report["cells"]}
    for task in report["tasks"]:
        for L in report["lengths"]:
            lines.append(f"| {task} | {L} | " + " | ".join(f"{acc[(task, L, n)]:.0f}" for n in names) + " |")
    avg = {(a["length"], a["run"]): a["accuracy"] for a in report["average_by_length"]}
    for L in report["lengths"]:
        lines.append(f"| **average** | {L} | " + " | ".join(f"**{avg[(L, n)]:.1f}**" for n in names) + " |")
    lines += ["", "| run | mean relative error of attention outputs vs full | decode tokens/s |", "|---|---|---|"]
    for n, r in report["per_run"].items():
        lines.append(f"| {n} | {r['mean_rel_err_attention']} | {r['decode_tokens_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--sweep", default="32,300")
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=False,
                    help="also run flat with top_k = all (must equal full)")
    ap.add_argument("--out", default="bench/results/accuracy.json")
    ap.add_argument("--md", default="docs/accuracy.md")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(device="cpu"))
    tasks, lengths = a.tasks.split(","), [int(x) for x in a.lengths.split(",")]
    runs = configs(a.top_k, [int(x) for x in a.sweep.split(",") if x], a.exact)
    result = evaluate(engine, tasks, lengths, a.samples, runs)
    report = {"bench": "accuracy", "model": "smollm2-135m-instruct", "tasks": tasks, "lengths": lengths,
              "samples_per_cell": a.samples, "top_k": a.top_k, "machine": f"CPU, {os.cpu_count()} cores",
              "command": "python bench/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "wall_s": time.perf_counter() - t0, **result}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    Path(a.md).parent.mkdir(parents=True, exist_ok=True)
    Path(a.md).write_text(markdown(report))
    print(markdown(report))
    engine.shutdown()


if __name__ == "__main__":
    main()
