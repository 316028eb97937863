"""Fuzz a live server with schemathesis against its own OpenAPI schema: positive and negative cases for
every operation (coverage, fuzzing and stateful phases), checking that no response is a server error.
Then the server must still be healthy and answer a real chat request.

    python bench/fuzz.py --max-examples 500 --out bench/results/fuzz.json     # the long run (>= 5,000 cases)
    python bench/fuzz.py --max-examples 2 --out /tmp/fuzz.json                # a short run (make test)

The server runs the embedded model on CPU with a short context and a request timeout
(`--max-model-len 128 --request-timeout 0.5`), so that valid generation requests end in seconds whatever
max_tokens the fuzzer picks; everything else is the server as users run it. Every status code is
counted twice: as schemathesis saw it (its NDJSON report) and as the server logged it (access log).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

from server_util import server_log, start_server  # noqa: E402

MODEL = "smollm2-135m-instruct"
SERVER_ARGS = ["--max-model-len", "128", "--request-timeout", "0.5", "--max-queue", "16"]
ACCESS = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS|TRACE|[A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')


def parse_report(path: Path) -> dict:
    """Statuses, cases and failed checks from schemathesis' NDJSON event stream."""
    statuses, per_op, phases = collections.Counter(), collections.defaultdict(collections.Counter), collections.Counter()
    failures, cases, errors = [], 0, []
    for line in path.read_text().splitlines():
        ev = json.loads(line)
        if "NonFatalError" in ev:  # the fuzzer's own trouble with an operation (not a response of the server)
            err = ev["NonFatalError"]
            errors.append({"operation": err.get("label"), "phase": err.get("phase"), **err.get("value", {})})
        fin = ev.get("ScenarioFinished")
        if not fin or fin["status"] == "skip" or "cases" not in fin["recorder"]:
            continue
        rec = fin["recorder"]
        cases += len(rec["cases"])
        phases[fin["phase"]] += len(rec["cases"])
        for inter in rec["interactions"].values():
            resp = inter.get("response")
            code = str(resp["status_code"]) if resp else "no_response"
            statuses[code] += 1
            per_op[rec["label"]][code] += 1
        for checks in rec["checks"].values():
            failures += [{"operation": rec["label"], **c} for c in checks if c["status"] != "success"]
    return {"cases": cases, "phases": dict(phases), "statuses": dict(statuses),
            "per_operation": {k: dict(v) for k, v in sorted(per_op.items())}, "failed_checks": failures,
            "fuzzer_errors": errors}


def server_statuses(log: str) -> dict:
    c = collections.Counter(m.group(3) for m in ACCESS.finditer(log))
    return dict(sorted(c.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=500, help="schemathesis examples per operation and phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--server-args", default="", help="extra `rattn serve` flags")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    a = ap.parse_args(argv)

    proc, base = start_server(*SERVER_ARGS, *a.server_args.split())
    report_dir = Path(tempfile.mkdtemp(prefix="rattn-fuzz-"))
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", base + "/openapi.json",
           "--checks", "not_a_server_error", "--mode", "all", "-n", str(a.max_examples), "--seed", str(a.seed),
           "--workers", str(a.workers), "--report", "ndjson", "--report-dir", str(report_dir),
           "--request-timeout", "60", "--continue-on-failure", "--suppress-health-check", "all"]
    start = len(server_log(proc))  # the health polls of the start-up (503 while loading) are not the fuzzer's
    t0 = time.time()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        took = time.time() - t0
        health = httpx.get(base + "/health", timeout=10).status_code
        for attempts in range(1, 6):  # greedy: a sampled first token can end the turn, an empty answer
            chat = httpx.post(base + "/v1/chat/completions", timeout=60, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 8,
                "temperature": 0})
            body = chat.json() if chat.status_code == 200 else None
            answer = body["choices"][0]["message"]["content"] if body else chat.text[:500]
            serving = body is not None and bool(answer)
            # again only when the server's 0.5 s request timeout ended it before its first token (a loaded machine)
            if serving or body is None or not (body["choices"][0]["finish_reason"] == "length"
                                               and body["usage"]["completion_tokens"] == 0):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    log = server_log(proc)[start:]
    rep = parse_report(next(report_dir.glob("*.ndjson")))
    fives = {k: v for k, v in rep["statuses"].items() if k.isdigit() and int(k) >= 500}
    server_fives = {k: v for k, v in server_statuses(log).items() if int(k) >= 500}
    out = {
        "command": " ".join(["python", "bench/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
        "schemathesis": " ".join(cmd[1:]).replace(base, "<server>"),
        "server_args": SERVER_ARGS + a.server_args.split(),
        "machine": "dev CPU (2 cores, no GPU), embedded SmolLM2-135M-Instruct, float32",
        "seconds": round(took, 1),
        "schemathesis_exit_code": run.returncode,
        **rep,
        "server_logged_statuses": server_statuses(log),
        "server_tracebacks": log.count("Traceback"),
        "alive_after": {"health": health, "chat_ok": serving, "chat_status": chat.status_code, "answer": answer,
                        "attempts": attempts},
        "server_exit_code": rc,
        "targets": {"no_5xx": not fives and not server_fives and not rep["failed_checks"],
                    "alive_and_serving": health == 200 and serving},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("cases", "phases", "statuses", "server_logged_statuses", "alive_after",
                                          "fuzzer_errors", "targets", "seconds")}, indent=1))
    if run.returncode not in (0, 1) or not out["targets"]["no_5xx"]:
        print(run.stdout[-5000:], run.stderr[-3000:], file=sys.stderr)
    return 0 if all(out["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
