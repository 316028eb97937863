"""A live server under the faults operators see: clients that leave, long waits behind proxies, SIGTERM."""
import json
import signal
import socket
import threading
import time

import httpx
import pytest

from server_util import live_server, metric, server_log, start_server

MODEL = "smollm2-135m-instruct"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 3000,
        "ignore_eos": True, "temperature": 0, "attention": {"sink": 16, "window": 32}}


@pytest.fixture(scope="module")
def base():
    with live_server("--sse-keepalive", "0.3", "--max-num-seqs", "1") as b:  # a second request waits
        yield b


def wait_idle(base, timeout=10.0) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if metric(base, "rattn:num_requests_running") == 0 and metric(base, "rattn:cpu_kv_bytes") == 0:
            return time.monotonic() - t
        time.sleep(0.02)
    raise AssertionError("the server did not become idle")


def open_plain_request(base: str, body: dict) -> socket.socket:
    """A plain POST sent on a raw socket, so that the test decides the moment the client leaves."""
    host, port = base.rsplit("/", 1)[1].split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


# 1. a plain (non-streaming) client that leaves stops its generation within a decode step
def test_a_plain_client_that_disconnects_is_aborted_within_a_step(base):
    wait_idle(base)
    gen0 = metric(base, "rattn:generation_tokens_total")
    sock = open_plain_request(base, LONG)
    deadline = time.monotonic() + 60
    while metric(base, "rattn:generation_tokens_total") < gen0 + 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()  # the client leaves mid-generation
    at_close = metric(base, "rattn:generation_tokens_total")
    freed_in = wait_idle(base, timeout=2.0)
    after = metric(base, "rattn:generation_tokens_total")
    print(f"\n[disconnect] tokens after the client left: {after - at_close:g}; idle after {freed_in:.3f} s")
    assert at_close >= gen0 + 5, "the request never started generating"
    # tokens counted after the client left: the step in flight and the one whose output was queued
    assert after - at_close <= 2, f"{after - at_close} tokens generated after the client left"
    assert freed_in < 1.0 and metric(base, 'rattn:request_success_total{finished_reason="abort"}') >= 1


# keep-alive comments while a stream waits in the queue and in prefill
def test_a_waiting_stream_gets_keepalive_comments(base):
    wait_idle(base)
    blocker = threading.Thread(target=lambda: httpx.post(base + "/v1/chat/completions",
                                                         json={**LONG, "max_tokens": 60}, timeout=120))
    blocker.start()
    time.sleep(0.3)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "stream": True}
    lines = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data:"):
                break
    blocker.join()
    first_data = len(lines) - 1
    assert ": keep-alive" in lines[:first_data], lines


def test_the_request_id_is_in_the_response_and_the_log():
    proc, base = start_server("--max-queue", "4")
    try:
        r = httpx.post(base + "/v1/completions", headers={"X-Request-Id": "trace-7f3a"},
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "attention": {"mode": "nope"}})
        assert r.status_code == 400 and r.headers["x-request-id"] == "trace-7f3a"
        r = httpx.post(base + "/v1/completions", headers={"X-Request-Id": "trace-8b4c"},
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = server_log(proc).splitlines()
    assert any("[trace-7f3a]" in ln and "400" in ln for ln in lines)      # the access log line
    assert any("[trace-8b4c" in ln and "200" in ln for ln in lines)


# graceful shutdown: 503 for new work, running requests finish or get a final chunk, exit 0 in time
def test_sigterm_with_four_requests_exits_0_and_ends_every_stream():
    timeout = 3.0
    proc, base = start_server("--shutdown-timeout", str(timeout), "--max-queue", "8")
    streams: dict[int, list[str]] = {}

    def run(i, max_tokens):
        lines = streams.setdefault(i, [])
        with httpx.stream("POST", base + "/v1/chat/completions", timeout=60,
                          json={**LONG, "max_tokens": max_tokens, "stream": True}) as r:
            for line in r.iter_lines():
                lines.append(line)

    # the first finishes within the timeout; the other three are still running or queued at its end
    threads = [threading.Thread(target=run, args=(i, 12 if i == 0 else 3000)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    def chunks(i):
        return sum(line.startswith("data: {") for line in streams.get(i, []))

    # the signal comes once the second has begun and the first is 4 tokens or fewer from its end (the role
    # chunk and 8 tokens): on a slow machine too, it ends within the timeout
    deadline = time.monotonic() + 60
    while not (chunks(1) and chunks(0) >= 9) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.monotonic() < deadline, (chunks(0), chunks(1))
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert httpx.get(base + "/health").status_code == 503
    late = httpx.post(base + "/v1/chat/completions", json={**LONG, "max_tokens": 2})
    assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable"
    rc = proc.wait(timeout + 10)
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    print(f"\n[sigterm] exit code {rc} after {took:.2f} s (--shutdown-timeout {timeout:g})")
    assert rc == 0, server_log(proc)[-3000:]
    assert took <= timeout + 2, f"exit took {took:.1f} s"
    for i, lines in streams.items():
        data = [ln[6:] for ln in lines if ln.startswith("data: ")]
        assert data[-1] == "[DONE]", (i, lines[-3:])
        final = [json.loads(d)["choices"][0]["finish_reason"] for d in data[:-1] if json.loads(d)["choices"]]
        assert final[-1] == ("length" if i == 0 else "abort"), (i, final[-3:])
