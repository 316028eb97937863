"""The HTTP API through the official openai SDK against a live uvicorn server on 127.0.0.1."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_util import live_server, metric

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def base():
    with live_server("--max-queue", "32") as b:
        yield b


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=kw.pop("messages", HELLO), **kw)


def test_chat_plain_and_usage(client):
    r = chat(client, max_tokens=16, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert c.message.role == "assistant" and c.message.content and c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_content_parts_and_max_completion_tokens(client):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colors."}]}]
    r = chat(client, messages=msgs, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_streaming_with_usage(client):
    plain = chat(client, max_tokens=12, temperature=0).choices[0].message.content
    chunks = list(chat(client, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == plain


def test_completions_plain_list_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=["Once upon a time", "The sky is"], max_tokens=6,
                                  temperature=0, logprobs=2)
    assert r.object == "text_completion" and len(r.choices) == 2
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    s = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                       stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_stop_strings(client):
    full = chat(client, max_tokens=20, temperature=0).choices[0].message.content
    stop = full.split()[2]
    r = chat(client, max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seed_reproducibility_and_n(client):
    a = chat(client, max_tokens=12, temperature=1.0, seed=42).choices[0].message.content
    b = chat(client, max_tokens=12, temperature=1.0, seed=42).choices[0].message.content
    assert a == b
    r = chat(client, max_tokens=12, temperature=1.0, seed=42, n=2)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.content == a
    assert r.choices[1].message.content != a


def test_chat_logprobs(client):
    r = chat(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0


def test_attention_extension_per_request(client):
    for mode in ("full", "streaming", "flat", "hnsw", "retrieval"):
        r = chat(client, max_tokens=6, temperature=0, extra_body={"attention": {"mode": mode, "top_k": 8, "sink": 4,
                                                                               "window": 8}})
        assert r.choices[0].message.content
    # the graph's build parameters are per request too (this prompt is short: a tiny window offloads most)
    r = chat(client, max_tokens=6, temperature=0, extra_body={"attention": {
        "mode": "retrieval", "sink": 4, "window": 8, "degree": 8, "knn": 4, "max_queries": 16,
        "query_stride": 8, "copy_threshold": 0.0}})
    assert r.choices[0].message.content


@pytest.mark.parametrize("kw,param", [
    (dict(temperature=5), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"), (dict(max_tokens=0), "max_tokens"),
    (dict(extra_body={"attention": {"mode": "magic"}}), "attention"),
    (dict(extra_body={"attention": {"degree": 2}}), "attention"),
    (dict(extra_body={"attention": {"copy_threshold": -1}}), "attention"),
    (dict(extra_body={"attention": {"query_stride": 0}}), "attention"),
    (dict(logit_bias={"1": 5}), None), (dict(top_logprobs=3), None),
])
def test_bad_values_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **{"max_tokens": 4, **kw})
    err = e.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert param in (err["param"] or "")


def test_context_overflow_is_400_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=9000)
    msg = e.value.body["message"]
    assert "8192" in msg and "9000" in msg


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=HELLO, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_malformed_json_and_unknown_fields(base):
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(base + "/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2,
                                                        "some_future_field": {"x": 1}}, timeout=60)
    assert r.status_code == 200
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user"}, 5]})
    assert r.status_code == 400
    assert httpx.get(base + "/health").status_code == 200  # still serving


def test_disconnect_mid_stream_frees_the_request(base):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story. " * 40}],
            "max_tokens": 400, "temperature": 0, "stream": True, "attention": {"sink": 16, "window": 32}}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data:") for line in got)
        assert metric(base, "rattn:num_requests_running") == 1
        assert metric(base, "rattn:cpu_kv_bytes") > 0
    deadline = time.time() + 10
    while time.time() < deadline and (metric(base, "rattn:num_requests_running") or metric(base, "rattn:cpu_kv_bytes")):
        time.sleep(0.2)
    assert metric(base, "rattn:num_requests_running") == 0
    assert metric(base, "rattn:cpu_kv_bytes") == 0
    assert metric(base, 'rattn:request_success_total{finished_reason="abort"}') >= 1


def test_sixteen_concurrent_streams_match_sequential(client):
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(4)] * 4

    def run(msgs):
        s = chat(client, messages=msgs, max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    alone = [run(m) for m in prompts[:4]]
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(run, prompts))
    assert together == alone * 4


def test_metrics_are_exposed(base, client):
    chat(client, max_tokens=4, temperature=0)
    text = httpx.get(base + "/metrics").text
    for name in ("rattn:num_requests_running", "rattn:num_requests_waiting", "rattn:prompt_tokens_total",
                 "rattn:generation_tokens_total", "rattn:request_success_total", "rattn:time_to_first_token_seconds",
                 "rattn:inter_token_latency_seconds", "rattn:e2e_request_latency_seconds",
                 "rattn:index_build_seconds", "rattn:retrieval_seconds", "rattn:cpu_kv_bytes"):
        assert name in text, name
    assert metric(base, "rattn:generation_tokens_total") > 0


def test_a_second_question_on_a_document_reports_its_cached_tokens(base, client):
    """The document cache through the API: the second question's prompt reuses the first's document,
    in usage.prompt_tokens_details.cached_tokens and in the metrics."""
    doc = " ".join(f"Line {i}: the weather in town number {i} was mild and dry." for i in range(80))
    sizes = []
    for q in ("Which town is line 7 about?", "What was the weather like?"):
        r = chat(client, messages=[{"role": "user", "content": doc + "\n\n" + q}], max_tokens=2, temperature=0)
        sizes.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
    (p1, c1), (p2, c2) = sizes
    assert p1 >= 1024 and c1 == 0  # long enough to be cached, and nothing to reuse yet
    assert p2 // 2 <= c2 < p2  # the document again: most of the prompt, never its last token
    assert metric(base, "rattn:doc_cache_hits") >= 1 and metric(base, "rattn:doc_cache_bytes") > 0


def test_openapi_page(base):
    assert httpx.get(base + "/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(base + "/openapi.json").json()["paths"]


def test_api_key_and_full_queue():
    with live_server("--api-key", "sekret", "--max-queue", "1", "--max-num-seqs", "1") as b:
        assert httpx.get(b + "/health").status_code == 200  # open without a key
        bad = openai.OpenAI(base_url=b + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body["type"] == "authentication_error"
        assert httpx.get(b + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=b + "/v1", api_key="sekret", max_retries=0, timeout=120)
        results = {}

        def long(i):
            try:
                good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=60, temperature=0,
                                             extra_body={"ignore_eos": True})
                results[i] = 200
            except openai.RateLimitError as err:
                results[i] = (429, err.body)

        threads = [threading.Thread(target=long, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join()
        codes = [r if r == 200 else r[0] for r in results.values()]
        assert 429 in codes and 200 in codes
        body = next(r[1] for r in results.values() if r != 200)
        assert body["type"] == "rate_limit_exceeded"
