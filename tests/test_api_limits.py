"""The HTTP layer in-process (the shared engine behind FastAPI): limits with clear errors, operator
endpoints and headers, and an event loop that tokenising never blocks."""
import asyncio
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from server.api_server import APIError, ServerConfig, _attention, _max_tokens, _sampling, create_app
from server.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Hi"}]


def make_app(engine, **cfg):
    app = create_app(ServerConfig(**cfg), load_in_background=True)
    app.state.rattn.engine = engine  # the shared engine, already loaded (no lifespan: nothing else starts)
    return app


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(make_app(engine, max_request_mb=1, allowed_origins=["https://app.example"]))


def post(client, path, body, **kw):
    return client.post(path, json={"model": MODEL, **body}, **kw)


@pytest.mark.parametrize("body,param", [
    ({"messages": HELLO, "max_tokens": 10**6}, "max_tokens"),
    ({"messages": HELLO, "max_completion_tokens": 9000}, "max_completion_tokens"),
    ({"messages": HELLO, "max_tokens": 2**70}, "max_tokens"),
    ({"messages": HELLO, "top_k": 10**6}, "top_k"),
    ({"messages": HELLO, "seed": 2**64}, "seed"),
    ({"messages": HELLO, "attention": {"sink": 1_000_000}}, "attention.sink"),
    ({"messages": HELLO, "attention": {"window": 9000}}, "attention.window"),
    ({"messages": HELLO, "attention": {"top_k": 9000}}, "attention.top_k"),
    ({"messages": HELLO, "attention": {"degree": 1000}}, "attention.degree"),
    ({"messages": HELLO, "attention": {"ef": 10**6}}, "attention.ef"),
    ({"messages": HELLO, "stop": ["x" * 5000]}, "stop"),
    ({"prompt": [1, 2, -3]}, "prompt"),
    ({"prompt": ["a"] * 40, "n": 4}, "prompt"),
])
def test_every_numeric_field_is_bounded_with_a_400_naming_it(client, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = post(client, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or ""), err


def test_infinity_and_nan_are_not_numbers(client):
    r = client.post("/v1/chat/completions", content=b'{"model": "%s", "messages": [{"role": "user", "content": "x"}],'
                    b' "temperature": NaN}' % MODEL.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_a_body_over_the_limit_is_413(client):
    big = "word " * 300_000  # 1.5 MB, limit 1 MiB
    r = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": big}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while read
        for _ in range(30):
            yield b" " * 65536

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_chat_template_that_raises_is_a_400(engine, client, monkeypatch):
    raising = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    monkeypatch.setattr(engine.tokenizer, "chat_template", raising)
    r = post(client, "/v1/chat/completions", {"messages": HELLO})
    assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages"


def test_request_id_is_echoed_or_made(client):
    r = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/health", headers={"X-Request-Id": "bad id with spaces\x01"})
    assert len(r.headers["x-request-id"]) == 32
    assert len(client.get("/health").headers["x-request-id"]) == 32


def test_cors_for_the_allowed_origin_only(client):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = client.options("/v1/chat/completions", headers={"Origin": "https://app.example", **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = client.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **pre})
    assert "access-control-allow-origin" not in r.headers


def test_tokenize_detokenize_and_version(engine, client):
    r = client.post("/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == engine.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.max_model_len
    assert body["token_strs"] == engine.tokenizer.convert_ids_to_tokens(body["tokens"])
    chat = client.post("/tokenize", json={"messages": HELLO}).json()
    assert chat["tokens"] == engine.encode_chat(HELLO)
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert client.post("/tokenize", json={"prompt": "a", "messages": HELLO}).status_code == 400
    assert client.post("/tokenize", json={"model": "gpt-9", "prompt": "a"}).status_code == 404
    assert client.get("/version").json()["version"]


def test_tokenising_a_long_prompt_does_not_block_the_event_loop(engine):
    app = make_app(engine, max_request_mb=64)
    long_text = "The quick brown fox jumps over the lazy dog. " * 60_000  # ~2.7 MB, ~600K tokens: seconds to tokenise

    async def run():
        gaps, last = [], time.perf_counter()

        async def ticker():  # the event loop's pulse: any blocking call shows as a long gap
            nonlocal last
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            tick = asyncio.create_task(ticker())
            t = time.perf_counter()
            r = await c.post("/tokenize", json={"prompt": long_text}, timeout=120)
            took = time.perf_counter() - t
            tick.cancel()
            return r.json()["count"], took, max(gaps, default=took)

    count, took, worst = asyncio.run(run())
    assert count > 500_000 and took > 1.0  # long enough to matter
    assert worst < 0.3, f"the event loop stalled {worst:.2f} s while a prompt was tokenised"


def test_dummy_weights_without_a_tokenizer_are_a_400_for_text(monkeypatch, engine):
    monkeypatch.setattr(engine, "tokenizer", None)
    client = TestClient(make_app(engine))
    r = post(client, "/v1/chat/completions", {"messages": HELLO})
    assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
    assert post(client, "/v1/completions", {"prompt": "text"}).status_code == 400
    assert client.post("/tokenize", json={"prompt": "x"}).status_code == 400
    r = post(client, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 1})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")


def test_an_aborted_stream_with_logprobs_and_a_stop_string_still_ends_properly(engine, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True, "logprobs": True, "stop": ["\n\n\n\n"],
            "attention": {"mode": "streaming", "sink": 4, "window": 16}}
    lines = []
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 12:
                engine.abort_all()  # as the shutdown drain does, with held-back text in the detokenizer
    data = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "abort"


def test_a_request_whose_engine_hangs_gets_a_503(engine, monkeypatch):
    monkeypatch.setattr(engine, "submit", lambda req, on_output: None)  # accepted, never answered
    monkeypatch.setattr(engine, "health", lambda: "the engine has made no progress for 130 s")
    client = TestClient(make_app(engine))
    t = time.monotonic()
    r = post(client, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3})
    assert r.status_code == 503 and "no progress" in r.json()["error"]["message"] and time.monotonic() - t < 5


def test_an_unhandled_error_is_a_500_that_keeps_the_request_id(engine, monkeypatch):
    monkeypatch.setattr(engine, "encode_chat", lambda *a: 1 / 0)
    client = TestClient(make_app(engine), raise_server_exceptions=False)
    r = post(client, "/v1/chat/completions", {"messages": HELLO}, headers={"X-Request-Id": "boom-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json()["error"]["type"] == "server_error"


def test_the_api_key_guards_tokenize_but_not_health(engine):
    client = TestClient(make_app(engine, api_key="k"))
    assert client.post("/tokenize", json={"prompt": "a"}).status_code == 401
    assert client.post("/tokenize", json={"prompt": "a"}, headers={"Authorization": "bearer k"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/version").status_code == 200


# hypothesis: any JSON-like body either becomes valid engine parameters or a 400, never another error
_num = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                 st.booleans(), st.text(max_size=3))
_attn = st.fixed_dictionaries({}, optional={k: _num for k in (
    "top_k", "sink", "window", "ef", "degree", "knn", "max_queries", "query_stride", "copy_threshold")}
    | {"mode": st.sampled_from(["full", "streaming", "flat", "hnsw", "retrieval", "other", 3])})
_body = st.fixed_dictionaries({"model": st.just(MODEL)}, optional={
    **{k: _num for k in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                         "presence_penalty", "frequency_penalty", "n", "top_logprobs", "logprobs")},
    "stop": st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6)),
    "stream": st.booleans(), "attention": st.one_of(st.none(), _attn),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]),
                                                "content": st.one_of(st.text(max_size=10), st.none())}), max_size=3),
    "prompt": st.one_of(st.text(max_size=10), st.lists(st.integers(-5, 60000), max_size=5)),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body)
def test_any_body_becomes_valid_parameters_or_a_400(engine, body):
    for model in (ChatCompletionRequest, CompletionRequest):
        try:
            req = model.model_validate(body)
        except ValidationError:
            continue
        try:
            att = _attention(req, engine)
            mt = _max_tokens(getattr(req, "max_completion_tokens", None) or req.max_tokens, "max_tokens", 10, engine,
                             att)
            lp = req.logprobs if isinstance(req.logprobs, int) and not isinstance(req.logprobs, bool) else None
            sp = _sampling(req, mt, lp, engine)
        except APIError as e:
            assert e.status == 400 and e.message
            continue
        assert 1 <= sp.max_tokens <= engine.max_model_len and 0 <= sp.top_k <= engine.shape.vocab_size
        assert sp.seed is None or 0 <= sp.seed < 2**63
        if att is not None:
            assert att.sink <= engine.max_model_len and att.window <= engine.max_model_len
            assert att.index.degree <= 64 and att.index.ef <= 4096


def test_a_chat_request_without_max_tokens_is_capped_by_the_server_default(engine):
    fit = engine.tokens_that_fit(10, None)
    assert _max_tokens(None, "max_tokens", 10, engine, None, default=7) == 7
    assert _max_tokens(None, "max_tokens", 10, engine, None, default=0) == min(engine.max_model_len - 10, fit)
    assert _max_tokens(5, "max_tokens", 10, engine, None, default=3) == 5  # a client's own number wins
    body = {"model": MODEL, "messages": HELLO, "ignore_eos": True, "temperature": 0}
    r = post(TestClient(make_app(engine, default_max_tokens=3)), "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"
    with pytest.raises(ValueError):
        ServerConfig(default_max_tokens=-1)


def test_the_store_dtype_follows_the_model_dtype_unless_set():
    """auto: a bfloat16 model's K/V are stored in bf16 (they lose nothing), a float32 model's in float32."""
    import argparse

    from server.cli import ENGINE_FLAGS, engine_config, resolve_args

    def store(**flags):
        ns = argparse.Namespace(**{k: None for k in ENGINE_FLAGS}, config=None)
        vars(ns).update(flags)
        return engine_config(resolve_args(ns, ENGINE_FLAGS)).attention.index.dtype

    assert store(device="cpu") == "float32"
    assert store(device="cpu", dtype="bfloat16") == "bf16"
    assert store(device="cpu", dtype="bfloat16", kv_store_dtype="int8") == "int8"
