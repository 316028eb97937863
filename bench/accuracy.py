"""Fidelity: RULER-style tasks, every attention mode side by side on the same prefill.

Each sample is prefilled once into one SequenceKV per configuration (the engine's fork), then
decoded greedily under each until its answer is complete (or the task's token budget is spent: the
same rule for every configuration, so accuracy is what a longer decode would give). Per cell:
accuracy. Per configuration: mean relative error of the attention outputs against `full` (every
layer, at the decode steps whose token prefix still equals full's), decode tokens/s.

Every sample is appended to a JSONL file as it finishes; a run resumes from it, and runs over
different lengths add to one report. `--http CONFIG` also sends the samples of `--http-lengths`
through a live `rattn serve` with that configuration, to show the server answers as the engine does.

    python bench/accuracy.py --lengths 1024,2048,4096,8192 --samples 12 --http retrieval
    rattn eval --lengths 1024,2048 --samples 3        # the same, through the CLI
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.tasks import TASKS  # noqa: E402
from engine.attention import AttentionConfig  # noqa: E402
from engine.kv import SequenceKV  # noqa: E402
from engine.llm_engine import Engine, EngineConfig  # noqa: E402

# the chat model restates the question before answering: budgets measured on its full-attention answers
MAX_NEW = {"passkey": 12, "niah_single_number": 24, "niah_single_word": 24, "niah_single_uuid": 44,
           "niah_multikey": 24, "niah_multivalue": 56, "variable_tracking": 40}
MODEL = "smollm2-135m-instruct"


@dataclass
class Run:
    name: str
    att: AttentionConfig


def configs(top_k: int, sweep: list[int], exact: bool, modes=("streaming", "flat", "hnsw", "retrieval"),
            store_dtypes=()) -> list[Run]:
    runs = [Run("full", AttentionConfig(mode="full"))]
    runs += [Run(m, AttentionConfig(mode=m, top_k=top_k)) for m in modes]
    runs += [Run(f"retrieval@{k}", AttentionConfig(mode="retrieval", top_k=k)) for k in sweep if k != top_k]
    if exact:
        runs.append(Run("flat@all", AttentionConfig(mode="flat", top_k=10**9)))
    # the same modes with compact CPU stores (the runs above keep float32)
    runs += [Run(f"{m}/{dt}", AttentionConfig(mode=m, top_k=top_k).override(dtype=dt))
             for dt in store_dtypes for m in modes if m in ("flat", "retrieval")]
    return runs


def make_sample(tokenizer, task: str, length: int, seed: int):
    """The task's sample for (length, seed): the same prompt on every run, engine path or HTTP."""
    return TASKS[task](tokenizer, length, seed=10_000 * length + seed)


def run_sample(engine: Engine, ids: list[int], runs: list[Run], max_new: int, done=None) -> dict:
    """-> {run name: {"text", "tokens", "decode_s", "rel_err" (list)}}; full must be runs[0].
    `done(text)`, if given, ends a configuration's decode early once its answer is complete."""
    kvs = [SequenceKV(engine.shape, r.att, len(ids) + max_new, engine.device, engine.model.dtype, engine.copy_scores)
           for r in runs]
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
            if done and done(engine.tokenizer.decode(tokens, skip_special_tokens=True)):
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


def evaluate(engine: Engine, tasks: list[str], lengths: list[int], samples: int, runs: list[Run],
             records_path: Path | None = None, shard: tuple[int, int] = (0, 1), log=print):
    """Runs every configuration of every (length, task, seed) that `records_path` lacks, appending a
    record of those outputs there (full always runs: it is the reference of the others);
    `shard` (i, n) takes the seeds s with s % n == i, so that n processes can share one run."""
    have = {_key(r): r for r in load_records(records_path)} if records_path else {}
    for length in lengths:
        for s in range(samples):  # seed-major: a run stopped early leaves every task with the same count
            for task in tasks:
                old = have.get((task, length, s), {"outputs": {}})["outputs"]
                todo = [r for r in runs if r.name not in old or r is runs[0]]
                if (len(todo) == 1 and "full" in old) or s % shard[1] != shard[0]:
                    continue
                sample = make_sample(engine.tokenizer, task, length, s)
                ids = sample.prompt_ids(engine)
                res = run_sample(engine, ids, todo, MAX_NEW[task], done=sample.correct)
                if "full" in old and old["full"]["text"] != res["full"]["text"] and len(todo) < len(runs):
                    # the record's other outputs followed another reference: redo them all
                    log(json.dumps({"full_differs_from_record": [task, length, s]}), flush=True)
                    res = run_sample(engine, ids, runs, MAX_NEW[task], done=sample.correct)
                rec = {"task": task, "length": length, "seed": s, "prompt_tokens": len(ids),
                       "answers": sample.answers,
                       "outputs": {name: {"text": r["text"], "correct": sample.correct(r["text"]),
                                          "tokens": len(r["tokens"]), "decode_s": round(r["decode_s"], 4),
                                          "rel_err_sum": sum(r["rel_err"]), "rel_err_n": len(r["rel_err"])}
                                   for name, r in res.items()}}
                if records_path:
                    with records_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                log(json.dumps({"task": task, "length": length, "seed": s, "tokens": len(ids),
                                **{n: o["correct"] for n, o in rec["outputs"].items()}}), flush=True)


def _key(rec: dict) -> tuple:
    return rec["task"], rec["length"], rec["seed"]


def load_records(path: Path) -> list[dict]:
    """One record per sample: the lines of a sample merge, a later line's outputs replacing earlier ones."""
    merged: dict[tuple, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line:
            rec = json.loads(line)
            if _key(rec) in merged:
                merged[_key(rec)]["outputs"].update(rec["outputs"])
            else:
                merged[_key(rec)] = rec
    return list(merged.values())


def summarize(records: list[dict], names: list[str]) -> dict:
    cells = defaultdict(lambda: [0, 0])  # (task, length, run) -> [correct, total]
    err, dec = defaultdict(lambda: [0.0, 0]), defaultdict(list)
    for rec in records:
        for n in names:
            o = rec["outputs"].get(n)
            if o is None:  # a configuration not run (yet) on this sample
                continue
            c = cells[(rec["task"], rec["length"], n)]
            c[0] += o["correct"]
            c[1] += 1
            err[n][0] += o["rel_err_sum"]
            err[n][1] += o["rel_err_n"]
            if o["tokens"] > 1:  # the first token comes from the prefill
                dec[n].append((o["tokens"] - 1) / o["decode_s"])
    table = [{"task": t, "length": L, "run": n, "correct": c[0], "total": c[1], "accuracy": round(100 * c[0] / c[1], 1)}
             for (t, L, n), c in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0], names.index(kv[0][2])))]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lengths = sorted({r["length"] for r in records})
    avg = []
    for L in lengths:
        for n in names:
            accs = [c["accuracy"] for c in table if c["length"] == L and c["run"] == n]
            avg.append({"length": L, "run": n, "accuracy": round(sum(accs) / len(tasks), 1) if len(accs) == len(tasks)
                        else None})
    per_run = {n: {"mean_rel_err_attention": round(err[n][0] / err[n][1], 5) if err[n][1] else None,
                   # median over samples: robust to a sample slowed by other work on the machine
                   "decode_tokens_per_s_median": round(float(np.median(dec[n])), 2) if dec[n] else None}
               for n in names}
    return {"tasks": tasks, "lengths": lengths, "samples_per_cell": min(c[1] for c in cells.values()),
            "samples_per_cell_by_length": {L: min(c[1] for (_, l2, _), c in cells.items() if l2 == L) for L in lengths},
            "cells": table, "average_by_length": avg, "per_run": per_run}


def http_check(records: list[dict], run: Run, lengths: list[int], tokenizer, log=print) -> dict:
    """Sends each sample (same messages, greedy, as many tokens as the engine path decoded) through a live
    server under `run`'s attention settings and compares the text with the engine path's."""
    import openai

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from server_util import live_server

    att = {"mode": run.att.mode, "top_k": run.att.top_k, "sink": run.att.sink, "window": run.att.window}
    same = agree = n = 0
    with live_server() as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        for rec in records:
            if rec["length"] not in lengths:
                continue
            sample = make_sample(tokenizer, rec["task"], rec["length"], rec["seed"])
            o = rec["outputs"][run.name]
            text = client.chat.completions.create(
                model=MODEL, messages=sample.messages, max_tokens=o["tokens"], temperature=0,
                extra_body={"attention": att}).choices[0].message.content
            n += 1
            same += text == o["text"]
            agree += sample.correct(text) == o["correct"]
            if text != o["text"]:
                log(json.dumps({"http_differs": rec["task"], "length": rec["length"], "seed": rec["seed"],
                                "engine": o["text"], "http": text}))
    return {"run": run.name, "lengths": lengths, "samples": n, "identical_text": same, "same_correctness": agree}


def _fmt(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    names = list(report["per_run"])
    lines = ["# Accuracy: RULER-style tasks, every attention mode on the same prefill", "",
             "Commands: " + "; ".join(f"`{c}`" for c in report["commands"]) + "  ",
             f"Model: {report['model']}, at least {report['samples_per_cell']} samples per cell, "
             f"top_k {report['top_k']}, sink 128, window 512, greedy. Machine: {report['machine']}; "
             f"{report['wall_s']:.0f} s of wall time, summed over the processes that shared the run.", "",
             "| task | length | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    acc = {(c["task"], c["length"], c["run"]): c["accuracy"] for c in report["cells"]}
    for task in report["tasks"]:
        for L in report["lengths"]:
            lines.append(f"| {task} | {L} | " + " | ".join(_fmt(acc.get((task, L, n)), "{:.0f}") for n in names) + " |")
    avg = {(a["length"], a["run"]): a["accuracy"] for a in report["average_by_length"]}
    for L in report["lengths"]:
        lines.append(f"| **average** | {L} | " + " | ".join(_fmt(avg[(L, n)], "**{:.1f}**") for n in names) + " |")
    by_len = ", ".join(f"{L}: {c}" for L, c in report["samples_per_cell_by_length"].items())
    lines += ["", f"Samples per cell by length: {by_len}."]
    lines += ["", "| run | mean relative error of attention outputs vs full | decode tokens/s (median over samples) |", "|---|---|---|"]
    for n, r in report["per_run"].items():
        lines.append(f"| {n} | {r['mean_rel_err_attention']} | {r['decode_tokens_per_s_median']} |")
    if report.get("http"):
        h = report["http"]
        lines += ["", f"Through the HTTP API (`rattn serve`, openai SDK), `{h['run']}` at lengths {h['lengths']}: "
                      f"{h['identical_text']}/{h['samples']} answers identical to the engine path's, "
                      f"{h['same_correctness']}/{h['samples']} with the same correctness."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL, help="the embedded model, or gemma-3-270m (a base model: "
                                                 "completion-style prompts)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--sweep", default="32,300")
    ap.add_argument("--modes", default="streaming,flat,hnsw,retrieval", help="modes beside full")
    ap.add_argument("--store-dtypes", default="", help="also flat and retrieval with these CPU stores (bf16,int8)")
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=False,
                    help="also run flat with top_k = all (must equal full)")
    ap.add_argument("--http", default="", help="a configuration (e.g. retrieval) to check through a live server")
    ap.add_argument("--http-lengths", default="1024")
    ap.add_argument("--records", default="bench/results/accuracy_samples.jsonl",
                    help="per-sample JSONL: resumed from, appended to; the report covers every record in it")
    ap.add_argument("--shard", default="0/1", help="i/n: this process takes seeds s with s %% n == i")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch, numba and hnswlib threads (0: all cores); decode is latency-bound, so two "
                         "one-thread shards finish sooner than one two-thread run on 2 cores")
    ap.add_argument("--out", default="bench/results/accuracy.json")
    ap.add_argument("--md", default="docs/accuracy.md")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.threads:
        import numba

        torch.set_num_threads(a.threads)
        numba.set_num_threads(a.threads)
    if a.http and a.model != MODEL:
        raise SystemExit("--http checks the embedded chat model only")
    engine = Engine(EngineConfig(model=a.model, device="cpu", doc_cache_gb=0))
    tasks, lengths = a.tasks.split(","), [int(x) for x in a.lengths.split(",")]
    runs = configs(a.top_k, [int(x) for x in a.sweep.split(",") if x], a.exact, [m for m in a.modes.split(",") if m],
                   [d for d in a.store_dtypes.split(",") if d])
    for r in runs:
        r.att = r.att.override(threads=a.threads)
    http_run = next((r for r in runs if r.name == a.http), None)
    if a.http and http_run is None:
        raise SystemExit(f"--http {a.http!r}: not one of {', '.join(r.name for r in runs)}")
    records_path = Path(a.records)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    shard = tuple(int(x) for x in a.shard.split("/"))
    evaluate(engine, tasks, lengths, a.samples, runs, records_path, shard)
    out = Path(a.out)
    prev = json.loads(out.read_text()) if out.is_file() else {}
    command = "python bench/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    same_file = prev.get("records") == a.records
    records = load_records(records_path)
    engine.shutdown()  # an HTTP check's server loads its own copy
    http = (http_check(records, http_run, [int(x) for x in a.http_lengths.split(",")], engine.tokenizer)
            if http_run else prev.get("http") if same_file else None)
    report = {"bench": "accuracy", "model": a.model, "top_k": a.top_k, "machine": f"CPU, {os.cpu_count()} cores",
              "records": a.records,
              "commands": (prev.get("commands", []) if same_file else []) + [command],
              "wall_s": ((prev.get("wall_s") or 0) if same_file else 0) + time.perf_counter() - t0,
              "http": http, **summarize(records, [r.name for r in runs])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    Path(a.md).parent.mkdir(parents=True, exist_ok=True)
    Path(a.md).write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
