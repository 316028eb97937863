"""Load test of a live server: many concurrent clients mixing streaming and plain chat and completions,
mid-stream disconnects, cancelled requests and malformed bodies, while the server's resident memory
and its engine gauges are sampled; then checks that it comes back to idle, frees its CPU KV and is
still healthy.

It is an asyncio + httpx client rather than locust: we need exact control of when a stream or a
request is dropped, raw (malformed, oversized) bodies and one outcome record per request, and httpx
is already a dependency.

    python bench/load.py --clients 64 --duration 600 --out bench/results/load.json
    python bench/load.py --clients 8 --duration 40 --out /tmp/load_smoke.json --server-args "--attention flat"
    python bench/load.py --base http://127.0.0.1:8000 --pid 1234   # a server that is already running

Without --base it starts `python -m server.cli serve --host 127.0.0.1 --port <free> --device cpu
<--server-args>`, waits for GET /health == 200, and stops it with SIGTERM at the end.

Each client loops until --duration is over (its last request may finish after that: the drain). It
picks a kind at random: chat_stream, chat, completion_stream, completion, stream_disconnect (closes a
stream after a few chunks), cancel (cancels a plain request's task after a random delay; the server
must abort that generation) or bad:<variant> (malformed JSON, a JSON array, wrong types, values out of
range, unknown model, a missing field, an `attention` override out of range, a body over the server's
default 8 MiB limit).
After a 429 a client backs off 0.5-2 s.

Outcomes: ok; rate_limited (429, expected under this load); expected_error (400/404/413/422 for the
bad bodies); disconnected / cancelled (dropped on purpose); unexpected_5xx (a status >= 500, except
503 once the server is shutting down); stream_error (a 200 stream that ended in an OpenAI-shaped
error event: properly ended, but an error of type server_error counts as a 5xx); unterminated (a 200
stream without a final chunk with a finish_reason and `data: [DONE]`); unexpected_status (another
status, e.g. a bad body answered 200); bad_response (a 200 body without a finish_reason);
client_timeout (--request-timeout ran out); transport_error (connection errors).

Targets (exit code 1 if one is false; null where it cannot be measured):
  no_unexpected_5xx                      no unexpected_5xx and no server_error stream events
  every_request_ended                    no unterminated stream, client timeout or transport error
  rss_end_within_10pct_of_first_minute   RSS at the end <= 1.10 x RSS at the first sample at t >= 60 s
  cpu_kv_bytes_zero_when_idle            rattn:cpu_kv_bytes == 0 once running == waiting == 0
  alive_at_end                           GET /health == 200 after the load
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tasks import WORDS  # noqa: E402

MODEL = "smollm2-135m-instruct"
JSON = {"content-type": "application/json"}
KIND_WEIGHTS = {"chat_stream": 20, "chat": 14, "completion_stream": 12, "completion": 10,
                "stream_disconnect": 12, "cancel": 12, "bad": 20}
BAD_VARIANTS = ("malformed_json", "json_array", "wrong_type", "out_of_range", "unknown_model", "missing_field",
                "attention_out_of_range", "oversized")
BAD_EXPECTED = {"unknown_model": {404}, "oversized": {413, 400}}  # 400: over the context before a body limit
BAD_EXPECTED_DEFAULT = {400, 422}
DROPPED = ("disconnected", "cancelled", "client_timeout", "transport_error", "client_exception")
SHORT_CHATS = ["Name three colors.", "Count to five.", "What is the capital of France?",
               "Write a haiku about the sea.", "Say hello in Spanish.", "List two prime numbers.",
               "What is 12 times 7?", "Give me a word that rhymes with cat."]
SHORT_PROMPTS = ["The capital of France is", "Once upon a time,", "1, 2, 3, 4,", "The quick brown fox",
                 "def fibonacci(n):", "Roses are red,"]
VALID_ATTENTION = [{"mode": "flat"}, {"mode": "streaming"}, {"mode": "full"}, {"mode": "hnsw"},
                   {"mode": "retrieval", "top_k": 50}, {"top_k": 200, "ef": 64}]
CHARS_PER_TOKEN = 4.6  # of the filler below, in the embedded tokenizer (measured from usage.prompt_tokens)


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Rec:
    kind: str
    client: int
    t: float                       # start, seconds since the load began
    path: str = ""
    status: int | str | None = None
    outcome: str = ""
    latency_s: float | None = None
    ttft_s: float | None = None    # streams: to the first chunk with text
    stream: bool = False
    events: int = 0                # SSE data events
    tokens: int = 0                # text chunks (streams) or usage.completion_tokens (plain)
    prompt_tokens: int | None = None
    long_prompt: bool = False
    finish_reason: str | None = None
    done: bool = False             # saw data: [DONE]
    error_type: str | None = None  # of an OpenAI-shaped error (body or stream event)
    detail: str | None = None      # what went wrong, for the report's fault examples
    note: str | None = None        # what was sent (bad variant, drop point, prompt length, override)


def filler(rng: random.Random, tokens: int) -> str:
    out, n = [], 0
    while n < tokens * CHARS_PER_TOKEN:
        s = f"The {rng.choice(WORDS)} near the {rng.choice(WORDS)} is {rng.choice(WORDS)}. "
        out.append(s)
        n += len(s)
    return "".join(out)


def gen_body(rng: random.Random, a, chat: bool, stream: bool) -> tuple[str, dict, bool, str]:
    long = rng.random() < a.long_fraction
    note = ""
    if long:
        n = rng.randint(*a.long_tokens)
        text = filler(rng, n)
        note = f"long~{n}"
    if chat:
        q = rng.choice(SHORT_CHATS)
        content = f"{text}\nIgnore the text above. {q}" if long else q
        msgs = [{"role": "user", "content": content}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "You are a concise assistant."})
        body = {"model": MODEL, "messages": msgs}
        path = "/v1/chat/completions"
    else:
        body = {"model": MODEL, "prompt": (text + "\n" if long else "") + rng.choice(SHORT_PROMPTS)}
        path = "/v1/completions"
    body["max_tokens"] = rng.randint(*a.max_tokens)
    body["temperature"] = rng.choice([0.0, 0.7, 1.0])
    body["seed"] = rng.randrange(2**31)
    if stream:
        body["stream"] = True
        if rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
    if rng.random() < a.attention_fraction:
        body["attention"] = rng.choice(VALID_ATTENTION)
        note += f" attention={body['attention']}"
    return path, body, long, note.strip()


def bad_body(rng: random.Random, variant: str, big: bytes, oversized_mb: tuple[float, float]
             ) -> tuple[str, bytes, str]:
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    good = ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8} if chat else
            {"model": MODEL, "prompt": "hi", "max_tokens": 8})
    if rng.random() < 0.5:
        good["stream"] = True
    enc = lambda d: json.dumps(d).encode()  # noqa: E731
    if variant == "malformed_json":
        raw = rng.choice([enc(good)[:-7], b"{'model': 'x'}", b"\xff\xfe{\x00", b"", b"{" * 5000,
                          b'{"model": "' + MODEL.encode() + b'", "max_tokens": 8,}', b"nul"])
        return path, raw, f"raw={raw[:40]!r}"
    if variant == "json_array":
        raw = rng.choice([b"[]", b"[" + enc(good) + b"]", b'"a string"', b"42", b"null", b"true"])
        return path, raw, f"raw={raw[:40]!r}"
    if variant == "wrong_type":
        change = rng.choice([{"max_tokens": "x"}, {"temperature": "hot"}, {"n": 1.5}, {"stop": 3},
                             {"seed": "abc"}, {"top_p": [1]}, {"model": 7}, {"stream_options": "yes"},
                             {"messages": "hello"} if chat else {"prompt": {"text": "hi"}},
                             {"messages": [{"role": "user", "content": 5}]} if chat else {"prompt": [1.5, 2]}])
    elif variant == "out_of_range":
        change = rng.choice([{"temperature": 9}, {"temperature": -1}, {"top_p": 0}, {"top_p": 2},
                             {"max_tokens": 0}, {"max_tokens": -5}, {"n": 0}, {"n": 100},
                             {"presence_penalty": 5}, {"stop": ["a", "b", "c", "d", "e"]}])
    elif variant == "unknown_model":
        change = {"model": rng.choice(["gpt-4o", "llama-3-8b", MODEL + "-x", "nope"])}
    elif variant == "missing_field":
        key = rng.choice(["model", "messages" if chat else "prompt"])
        good.pop(key)
        return path, enc(good), f"missing={key}"
    elif variant == "attention_out_of_range":
        change = {"attention": rng.choice([{"top_k": 0}, {"degree": 1}, {"mode": "bogus"}, {"window": 0},
                                           {"knn": 5000}, {"ef": -1}, {"sink": -3}, {"top_k": 10**9}])}
    elif variant == "oversized":
        n = int(rng.uniform(*oversized_mb) * 2**20)  # MiB of text in the prompt
        text = big[:n].decode()
        if chat:
            good["messages"] = [{"role": "user", "content": text}]
        else:
            good["prompt"] = text
        return path, enc(good), f"bytes~{n}"
    else:
        raise ValueError(variant)
    good.update(change)
    return path, enc(good), json.dumps(change)[:80]


def error_info(resp: httpx.Response) -> tuple[str | None, str]:
    try:
        e = resp.json()["error"]
        return e.get("type"), str(e.get("message"))[:200]
    except Exception:
        return None, resp.text[:200]


async def read_stream(resp: httpx.Response, rec: Rec, t0: float, drop_after: int | None) -> bool:
    """Read SSE data events into rec; return True if we closed it on purpose after drop_after text chunks."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        rec.events += 1
        if data == "[DONE]":
            rec.done = True
            continue
        if rec.done:
            rec.detail = "an event after [DONE]"
        try:
            obj = json.loads(data)
        except ValueError:
            rec.detail = f"non-JSON event: {data[:100]}"
            continue
        if "error" in obj:
            e = obj["error"] or {}
            rec.error_type, rec.detail = e.get("type"), f"error event: {str(e.get('message'))[:200]}"
            continue
        for ch in obj.get("choices") or []:
            text = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
            if text:
                rec.tokens += 1
                if rec.ttft_s is None:
                    rec.ttft_s = time.perf_counter() - t0
            if ch.get("finish_reason") is not None:
                rec.finish_reason = ch["finish_reason"]
        if obj.get("usage"):
            rec.prompt_tokens = obj["usage"].get("prompt_tokens")
        if drop_after is not None and rec.tokens >= drop_after and rec.finish_reason is None:
            return True
    return False


def read_plain(resp: httpx.Response, rec: Rec):
    if resp.status_code == 200:
        try:
            obj = resp.json()
            rec.finish_reason = obj["choices"][0]["finish_reason"]
            rec.tokens = obj["usage"]["completion_tokens"]
            rec.prompt_tokens = obj["usage"]["prompt_tokens"]
        except Exception as e:  # noqa: BLE001
            rec.detail = f"unreadable 200 body ({type(e).__name__}): {resp.text[:200]}"
    else:
        rec.error_type, rec.detail = error_info(resp)


def classify(rec: Rec, variant: str | None, shutting_down: bool) -> str:
    s = rec.status
    if isinstance(s, str):
        return s
    if s == 503 and shutting_down:
        return "unavailable"
    if variant is not None:
        if s in BAD_EXPECTED.get(variant, BAD_EXPECTED_DEFAULT):
            return "expected_error"
        return "unexpected_5xx" if s >= 500 else "unexpected_status"
    if s == 200:
        if rec.stream:
            if rec.error_type is not None:
                return "stream_error"
            return "ok" if rec.finish_reason is not None and rec.done else "unterminated"
        return "ok" if rec.finish_reason is not None else "bad_response"
    if s == 429:
        return "rate_limited"
    return "unexpected_5xx" if s >= 500 else "unexpected_status"


class Load:
    def __init__(self, a, base: str, pid: int | None):
        self.a, self.base, self.pid = a, base, pid
        self.records: list[Rec] = []
        self.samples: list[dict] = []
        self.shutting_down = False
        self.t0 = 0.0
        size = int(a.oversized_mb[1] * 2**20) + 1
        words = random.Random(a.seed).choices(WORDS, k=size // 6 + 1)
        self.big = " ".join(words).encode()[:size]  # ASCII text for the oversized bodies

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ------------------------------------------------------------------ one request
    async def one(self, client: httpx.AsyncClient, cid: int, rng: random.Random) -> Rec:
        kind = rng.choices(list(self.a.mix), weights=list(self.a.mix.values()))[0]
        variant = None
        if kind == "bad":
            variant = rng.choice(BAD_VARIANTS)
            kind = "bad:" + variant
        rec = Rec(kind, cid, round(self.now(), 3))
        t0 = time.perf_counter()
        task = None
        try:
            async with asyncio.timeout(self.a.request_timeout):
                if variant is not None:
                    rec.path, raw, rec.note = bad_body(rng, variant, self.big, self.a.oversized_mb)
                    resp = await client.post(self.base + rec.path, content=raw, headers=JSON)
                    rec.status = resp.status_code
                    rec.error_type, rec.detail = error_info(resp)
                elif kind in ("chat_stream", "completion_stream", "stream_disconnect"):
                    chat = kind == "chat_stream" or (kind == "stream_disconnect" and rng.random() < 0.6)
                    rec.path, body, rec.long_prompt, rec.note = gen_body(rng, self.a, chat, True)
                    drop = rng.randint(1, 8) if kind == "stream_disconnect" else None
                    if drop:
                        rec.note = f"drop after {drop} chunks {rec.note}".strip()
                    rec.stream = True
                    async with client.stream("POST", self.base + rec.path, json=body) as resp:
                        rec.status = resp.status_code
                        if resp.status_code != 200:
                            await resp.aread()
                            rec.error_type, rec.detail = error_info(resp)
                        elif await read_stream(resp, rec, t0, drop):
                            rec.status = "disconnected"  # leaving the block closes the response
                else:
                    chat = kind == "chat" or (kind == "cancel" and rng.random() < 0.6)
                    rec.path, body, rec.long_prompt, rec.note = gen_body(rng, self.a, chat, False)
                    task = asyncio.ensure_future(client.post(self.base + rec.path, json=body))
                    if kind == "cancel":
                        delay = rng.uniform(*self.a.cancel_after)
                        rec.note = f"cancel after {delay:.2f}s {rec.note}".strip()
                        await asyncio.wait({task}, timeout=delay)
                        if not task.done():
                            task.cancel()
                            try:
                                await task
                            except BaseException:  # noqa: BLE001 (the cancellation we asked for)
                                pass
                            rec.status = "cancelled"
                    if rec.status is None:
                        resp = await task
                        rec.status = resp.status_code
                        read_plain(resp, rec)
        except TimeoutError:
            rec.status, rec.detail = "client_timeout", f"no end after {self.a.request_timeout}s"
        except httpx.TimeoutException as e:
            rec.status, rec.detail = "client_timeout", f"{type(e).__name__}: {e}"
        except httpx.TransportError as e:
            rec.status, rec.detail = "transport_error", f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 (a bug of ours; recorded, never fatal)
            rec.status, rec.detail = "client_exception", f"{type(e).__name__}: {e}"
        finally:
            if task is not None and not task.done():  # the timeout hit while a plain request was running
                task.cancel()
        rec.latency_s = round(time.perf_counter() - t0, 4)
        if rec.ttft_s is not None:
            rec.ttft_s = round(rec.ttft_s, 4)
        rec.outcome = classify(rec, variant, self.shutting_down)
        return rec

    async def client_loop(self, client: httpx.AsyncClient, cid: int, deadline: float):
        rng = random.Random(f"{self.a.seed}-{cid}")
        await asyncio.sleep(rng.uniform(0, min(2.0, self.a.duration / 10)))
        while time.perf_counter() < deadline:
            rec = await self.one(client, cid, rng)
            self.records.append(rec)
            if rec.status == 429:
                await asyncio.sleep(rng.uniform(0.5, 2.0))
            elif self.a.think > 0:
                await asyncio.sleep(rng.uniform(0, self.a.think))

    # ------------------------------------------------------------------ sampling
    async def sample(self, mclient: httpx.AsyncClient, phase: str) -> dict:
        s = {"t": round(self.now(), 2), "phase": phase, "rss_mb": rss_mb(self.pid)}
        t = time.perf_counter()
        try:
            r = await mclient.get(self.base + "/metrics")
            m = parse_metrics(r.text)
            s.update(running=m.get("rattn:num_requests_running"), waiting=m.get("rattn:num_requests_waiting"),
                     cpu_kv_bytes=m.get("rattn:cpu_kv_bytes"))
        except httpx.HTTPError as e:
            s["scrape_error"] = f"{type(e).__name__}: {e}"
        s["scrape_s"] = round(time.perf_counter() - t, 4)
        self.samples.append(s)
        return s

    async def sampler(self, mclient: httpx.AsyncClient, stop: asyncio.Event):
        k = 0
        while not stop.is_set():
            s = await self.sample(mclient, "load")
            if k % 5 == 0:
                done = len(self.records)
                print(f"[load] t={s['t']:6.1f}s requests={done} running={s.get('running')} "
                      f"waiting={s.get('waiting')} rss={s['rss_mb']} MB", file=sys.stderr, flush=True)
            k += 1
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.a.sample_every)
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ the run
    async def run(self) -> dict:
        a = self.a
        limits = httpx.Limits(max_connections=a.clients * 2 + 8, max_keepalive_connections=a.clients)
        timeout = httpx.Timeout(a.request_timeout, connect=30)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client, \
                httpx.AsyncClient(timeout=10) as mclient:
            self.t0 = time.perf_counter()
            deadline = self.t0 + a.duration
            stop = asyncio.Event()
            sampler = asyncio.create_task(self.sampler(mclient, stop))
            await asyncio.gather(*(self.client_loop(client, i, deadline) for i in range(a.clients)))
            load_end = self.now()
            stop.set()
            await sampler
            # the end: wait for idle, then the KV store, health and a last RSS sample
            idle, t_idle = False, time.perf_counter()
            while time.perf_counter() - t_idle < a.idle_timeout:
                s = await self.sample(mclient, "idle_wait")
                if s.get("running") == 0 and s.get("waiting") == 0:
                    idle = True
                    break
                await asyncio.sleep(1)
            idle_wait = time.perf_counter() - t_idle
            final = await self.sample(mclient, "end")
            try:
                health = (await mclient.get(self.base + "/health")).status_code
            except httpx.HTTPError as e:
                health = f"{type(e).__name__}: {e}"
            try:
                end_metrics = parse_metrics((await mclient.get(self.base + "/metrics")).text)
            except httpx.HTTPError:
                end_metrics = {}
        return {"load_s": round(min(load_end, a.duration), 2), "drain_s": round(max(load_end - a.duration, 0), 2),
                "idle": idle, "idle_wait_s": round(idle_wait, 2), "final": final, "health": health,
                "end_metrics": end_metrics}


# ---------------------------------------------------------------------------------------------- helpers
def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name or name{labels}: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            try:
                out[key] = float(val)
            except ValueError:
                pass
    return out


def pct(xs: list[float]) -> dict | None:
    if not xs:
        return None
    xs = sorted(xs)

    def q(p):
        k = (len(xs) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 4)

    return {"n": len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(xs[-1], 4)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `rattn serve` child process; its output goes to a log file (a pipe could fill and stall it)."""

    def __init__(self, extra: list[str], log_path: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--device", "cpu", *extra]
        self.log_path = log_path
        self.log = open(log_path, "w")
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=root,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid

    def wait_healthy(self, timeout: float) -> float:
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"the server was not healthy after {timeout}s:\n{self.tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 30) -> dict:
        t0 = time.perf_counter()
        killed = False
        exited_before = self.proc.poll()  # not None: it died during the run
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                killed = True
        self.log.close()
        return {"exit_code": self.proc.returncode, "exited_before_stop": exited_before is not None,
                "stop_s": round(time.perf_counter() - t0, 2),
                "killed_after_timeout": killed}

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        return "".join(Path(self.log_path).read_text(errors="replace").splitlines(True)[-n:])


def log_faults(path: str | None) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    lines = Path(path).read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if " ERROR " in ln or ln.startswith("ERROR:") or " CRITICAL " in ln]
    return {"tracebacks": sum(ln.startswith("Traceback") for ln in lines), "error_lines": len(errors),
            "first_error_lines": errors[:20]}


def summarize(a, load: Load, res: dict, server_info: dict, argv: list[str]) -> dict:
    recs = load.records
    by_kind: dict[str, Counter] = defaultdict(Counter)
    outcomes_by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        by_kind[r.kind][str(r.status)] += 1
        outcomes_by_kind[r.kind][r.outcome] += 1
    outcomes = Counter(r.outcome for r in recs)
    latency = {k: pct([r.latency_s for r in recs if r.kind == k and r.outcome in ("ok", "expected_error")])
               for k in sorted(by_kind)}
    ttft = {k: pct([r.ttft_s for r in recs if r.kind == k and r.ttft_s is not None and r.outcome == "ok"])
            for k in sorted(by_kind) if k.endswith("_stream")}
    gen_ok = [r for r in recs if r.outcome == "ok" and not r.kind.startswith("bad:")]
    rate_limited_latency = pct([r.latency_s for r in recs if r.outcome == "rate_limited"])
    server_errors = [r for r in recs if r.outcome == "stream_error" and r.error_type == "server_error"]
    faults = {}
    for o in ("unexpected_5xx", "stream_error", "unterminated", "client_timeout", "transport_error",
              "unexpected_status", "bad_response", "client_exception"):
        ex = [r for r in recs if r.outcome == o]
        if ex:
            faults[o] = {"count": len(ex), "examples": [asdict(r) for r in ex[:8]]}

    rss = [(s["t"], s["rss_mb"]) for s in load.samples if s.get("rss_mb") is not None]
    first_min = next((m for t, m in rss if t >= 60), rss[0][1] if rss else None)
    end_rss = rss[-1][1] if rss else None
    ratio = round(end_rss / first_min, 4) if first_min and end_rss else None
    final = res["final"]
    kv_end = final.get("cpu_kv_bytes")
    em = res["end_metrics"]
    success = {k.split('"')[1]: v for k, v in em.items() if k.startswith("rattn:request_success_total{")}
    scrape = [s["scrape_s"] for s in load.samples if "scrape_error" not in s]

    n5xx = outcomes["unexpected_5xx"] + len(server_errors)
    targets = {
        "no_unexpected_5xx": n5xx == 0,
        "every_request_ended": outcomes["unterminated"] + outcomes["client_timeout"] + outcomes["transport_error"] == 0,
        "rss_end_within_10pct_of_first_minute": None if ratio is None else ratio <= 1.10,
        "cpu_kv_bytes_zero_when_idle": bool(res["idle"] and kv_end == 0),  # false too if it never got idle
        "alive_at_end": res["health"] == 200,
    }
    return {
        "bench": "load",
        "command": "python bench/load.py " + " ".join(shlex.quote(x) for x in argv),
        "config": vars(a),
        "server": server_info,
        "duration_s": {"load": res["load_s"], "drain": res["drain_s"], "idle_wait": res["idle_wait_s"]},
        "requests": len(recs),
        "outcomes": dict(outcomes.most_common()),
        "counts_by_kind": {k: dict(by_kind[k].most_common()) for k in sorted(by_kind)},
        "outcomes_by_kind": {k: dict(outcomes_by_kind[k].most_common()) for k in sorted(outcomes_by_kind)},
        "latency_s": latency,
        "latency_s_all_generations_ok": pct([r.latency_s for r in gen_ok]),
        "latency_s_rate_limited": rate_limited_latency,
        "ttft_s": ttft,
        "throughput": {"generations_ok_per_s": round(len(gen_ok) / max(res["load_s"] + res["drain_s"], 1e-9), 3),
                       "text_chunks_or_tokens": sum(r.tokens for r in gen_ok),
                       "prompt_tokens_long": pct([r.prompt_tokens for r in gen_ok
                                                  if r.long_prompt and r.prompt_tokens]),
                       "prompt_tokens_short": pct([r.prompt_tokens for r in gen_ok
                                                   if not r.long_prompt and r.prompt_tokens])},
        "unexpected_5xx": n5xx,
        "unexpected_5xx_http": outcomes["unexpected_5xx"],
        "stream_server_error_events": len(server_errors),
        "unterminated_streams": outcomes["unterminated"],
        "client_timeouts": outcomes["client_timeout"],
        "transport_errors": outcomes["transport_error"],
        "client_exceptions": outcomes["client_exception"],
        "faults": faults,
        "rss_mb": {"samples": rss, "first_minute": first_min, "end": end_rss, "end_over_first_minute": ratio},
        "gauges": {"columns": ["t", "running", "waiting", "cpu_kv_bytes"],
                   "samples": [[s["t"], s.get("running"), s.get("waiting"), s.get("cpu_kv_bytes")]
                               for s in load.samples]},
        "metrics_scrape_s": {**(pct(scrape) or {}), "failures": len(load.samples) - len(scrape)},
        "end": {"idle": res["idle"], "cpu_kv_bytes": kv_end, "health": res["health"],
                "request_success_by_reason": success,
                "client_drops": outcomes["disconnected"] + outcomes["cancelled"] + outcomes["client_timeout"],
                "prompt_tokens_total": em.get("rattn:prompt_tokens_total"),
                "generation_tokens_total": em.get("rattn:generation_tokens_total")},
        "targets": targets,
    }


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    rss = report["rss_mb"]["samples"]
    if rss:
        ax1.plot([t for t, _ in rss], [m for _, m in rss], color="tab:blue", lw=1.5, label="server RSS")
    if report["rss_mb"]["first_minute"]:
        ax1.axhline(report["rss_mb"]["first_minute"] * 1.10, color="tab:red", ls=":", lw=1,
                    label="first minute + 10%")
    load_end = report["duration_s"]["load"]
    for ax in (ax1, ax2):
        ax.axvline(load_end, color="gray", ls="--", lw=1)
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(loc="lower right", fontsize=8)
    c = report["config"]
    o = report["outcomes"]
    ax1.set_title(f"rattn load: {c['clients']} clients, {report['duration_s']['load']:.0f} s "
                  f"(+{report['duration_s']['drain']:.0f} s drain); {report['requests']} requests, "
                  f"ok {o.get('ok', 0)}, 429 {o.get('rate_limited', 0)}, 5xx {report['unexpected_5xx']}",
                  fontsize=10)
    g = report["gauges"]["samples"]
    t = [s[0] for s in g]
    ax2.step(t, [s[1] if s[1] is not None else float("nan") for s in g], where="post", label="running",
             color="tab:green")
    ax2.step(t, [s[2] if s[2] is not None else float("nan") for s in g], where="post", label="waiting",
             color="tab:orange")
    ax2.set_ylabel("requests")
    ax2.set_xlabel("seconds since the load began (dashed: clients stop starting requests)")
    ax3 = ax2.twinx()
    ax3.plot(t, [s[3] / 2**20 if s[3] is not None else float("nan") for s in g], color="tab:purple", lw=0.8,
             alpha=0.6, label="cpu_kv (MB)")
    ax3.set_ylabel("CPU KV (MB)", color="tab:purple")
    h1, l1 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h3, l1 + l3, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _range(s: str, kind, least) -> tuple:
    lo, _, hi = s.partition("-")
    lo, hi = kind(lo), kind(hi or lo)
    if not least <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO-HI with {least} <= LO <= HI, got {s!r}")
    return lo, hi


def int_range(s: str) -> tuple[int, int]:
    return _range(s, int, 1)


def float_range(s: str) -> tuple[float, float]:
    return _range(s, float, 0)


def mix(s: str) -> dict[str, float]:
    out = {}
    for part in s.split(","):
        k, _, w = part.partition("=")
        k = k.strip()
        if k not in KIND_WEIGHTS:
            raise argparse.ArgumentTypeError(f"unknown kind {k!r}; kinds: {', '.join(KIND_WEIGHTS)}")
        try:
            out[k] = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KIND=WEIGHT, got {part!r}") from None
    if not any(v > 0 for v in out.values()):
        raise argparse.ArgumentTypeError("no kind has a positive weight")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600, help="seconds during which clients start requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/load.json", help="JSON report; the PNG goes beside it")
    ap.add_argument("--mix", type=mix, default=dict(KIND_WEIGHTS), metavar="KIND=W,...",
                    help="relative weights of the request kinds (default: "
                         + ",".join(f"{k}={v}" for k, v in KIND_WEIGHTS.items()) + ")")
    ap.add_argument("--max-tokens", type=int_range, default=(8, 48), metavar="LO-HI")
    ap.add_argument("--long-fraction", type=float, default=0.3, help="share of generations with a long prompt")
    ap.add_argument("--long-tokens", type=int_range, default=(300, 1000), metavar="LO-HI")
    ap.add_argument("--attention-fraction", type=float, default=0.1,
                    help="share of generations with a valid per-request `attention` override")
    ap.add_argument("--cancel-after", type=float_range, default=(0.05, 4.0), metavar="LO-HI",
                    help="seconds after which a `cancel` request is cancelled")
    ap.add_argument("--oversized-mb", type=float_range, default=(9.0, 12.0), metavar="LO-HI",
                    help="size of the bad:oversized bodies in MiB (above the server's default --max-request-mb of 8, "
                         "so that they get its 413)")
    ap.add_argument("--think", type=float, default=0.2, help="each client pauses up to this long between requests")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--sample-every", type=float, default=2.0)
    ap.add_argument("--idle-timeout", type=float, default=60)
    ap.add_argument("--server-args", default="", help='extra `rattn serve` flags, e.g. "--max-queue 32"')
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--server-log", default=None, help="server output (default: a temporary file)")
    ap.add_argument("--records", default=None, help="also write every request's record to this JSONL file")
    ap.add_argument("--base", default=None, help="target a running server at this URL instead of starting one")
    ap.add_argument("--pid", type=int, default=None, help="with --base: the server's pid, for its RSS")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)

    server = None
    server_info: dict = {}
    try:
        if a.base:
            base, pid = a.base.rstrip("/"), a.pid
            server_info = {"base": base, "pid": pid, "started_here": False}
        else:
            log_path = a.server_log or tempfile.mkstemp(prefix="rattn-load-", suffix=".log")[1]
            server = Server(shlex.split(a.server_args), log_path)
            base, pid = server.base, server.pid
            print(f"[load] starting {' '.join(server.cmd)} (log: {log_path})", file=sys.stderr, flush=True)
            startup = server.wait_healthy(a.startup_timeout)
            server_info = {"base": base, "pid": pid, "started_here": True, "cmd": server.cmd,
                           "startup_s": round(startup, 2), "log": log_path}
        load = Load(a, base, pid)
        res = asyncio.run(load.run())
    finally:
        if server is not None:
            load_obj = locals().get("load")
            if load_obj is not None:
                load_obj.shutting_down = True
            server_info.update(server.stop())
            server_info["log_faults"] = log_faults(server.log_path)
    report = summarize(a, load, res, server_info, argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    if a.records:
        Path(a.records).parent.mkdir(parents=True, exist_ok=True)
        Path(a.records).write_text("".join(json.dumps(asdict(r)) + "\n" for r in load.records))
    brief = {k: report[k] for k in ("requests", "outcomes", "duration_s", "unexpected_5xx", "unterminated_streams",
                                    "client_timeouts", "transport_errors", "client_exceptions", "targets")}
    brief["rss_mb"] = {k: v for k, v in report["rss_mb"].items() if k != "samples"}
    brief["end"] = report["end"]
    print(json.dumps(brief, indent=1))
    print(f"[load] wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0 if all(v is not False for v in report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
