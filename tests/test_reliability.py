"""No request can hang, kill or starve the engine: each fault of the reliability issue, at the engine."""
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import engine.kv as kv_module
import engine.llm_engine as llm_engine
from engine.attention import AttentionConfig
from engine.detokenize import IncrementalDetokenizer
from engine.llm_engine import Engine, EngineConfig, EngineUnavailable
from engine.logging_context import RequestIdFilter
from engine.model_runner import ModelRunner
from engine.sampling import SamplingParams
from engine.sequence import Request

SMALL = AttentionConfig(mode="retrieval", sink=16, window=32, evict_block=8)


def wait_until(cond, timeout=2.0) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def collect(engine, req):
    """Submit; -> (outputs list, event set at the final output)."""
    outs, done = [], threading.Event()

    def on(o):
        outs.append(o)
        if o.finish_reason:
            done.set()

    engine.submit(req, on)
    return outs, done


@pytest.fixture(scope="module")
def dummy_engine_factory():
    """Fresh engines to break: the embedded shape with random weights (no tokenizer), loaded in a second."""
    made = []

    def make(**kw):
        e = Engine(EngineConfig(model="smollm2-135m", load_format="dummy", device="cpu", **kw))
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown(timeout=5)


# 2. an output callback that raises ends its request only
def test_a_raising_callback_aborts_its_request_and_the_engine_serves_on(engine, long_prompt):
    calls = []

    def bad(o):
        calls.append(o)
        raise RuntimeError("Event loop is closed")

    engine.submit(Request(long_prompt[:200], SamplingParams(max_tokens=50, temperature=0), SMALL), bad)
    outs, done = collect(engine, Request(long_prompt[:200], SamplingParams(max_tokens=4, temperature=0), SMALL))
    assert done.wait(60), "the engine stopped serving after a callback raised"
    assert outs[-1].finish_reason == "length" and engine.health() is None
    assert calls[-1].finish_reason == "abort" and len(calls) <= 3  # aborted at its next step, not run to 50


# 3. shutdown never blocks on a full queue, and every request gets its final output
def test_shutdown_with_a_full_queue_ends_every_request(dummy_engine_factory):
    eng = dummy_engine_factory(max_queue=2, max_num_seqs=1)
    ids = list(range(10, 200))
    results = []
    for _ in range(3):  # one running, two waiting: the queue is full
        results.append(collect(eng, Request(ids, SamplingParams(max_tokens=2000, ignore_eos=True), SMALL)))
        time.sleep(0.2)
    with pytest.raises(llm_engine.QueueFull):
        eng.submit(Request(ids, SamplingParams(max_tokens=2), SMALL), lambda o: None)
    t = time.monotonic()
    eng.shutdown(timeout=10)
    assert time.monotonic() - t < 5 and not eng._thread.is_alive()
    for outs, done in results:
        assert done.is_set() and outs[-1].finish_reason == "abort"
    assert eng.cpu_kv_bytes() == 0
    with pytest.raises(EngineUnavailable):
        eng.submit(Request(ids, SamplingParams(max_tokens=2), SMALL), lambda o: None)


# liveness: a dead engine thread is reported, its waiting requests fail, new ones are refused
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_fails_requests_and_health(dummy_engine_factory):
    eng = dummy_engine_factory(max_queue=4)
    assert eng.health() is None
    eng._start = lambda seq: (_ for _ in ()).throw(SystemExit("simulated fatal error"))  # escapes `except Exception`
    first = collect(eng, Request([5, 6, 7], SamplingParams(max_tokens=3), SMALL))
    assert first[1].wait(10)
    eng._thread.join(5)
    assert "engine thread has ended" in eng.health()
    assert first[0][-1].finish_reason == "error" and first[0][-1].error_status == 503
    with pytest.raises(EngineUnavailable):
        eng.submit(Request([5, 6, 7], SamplingParams(max_tokens=3), SMALL), lambda o: None)


def test_health_reports_an_engine_that_makes_no_progress(dummy_engine_factory):
    eng = dummy_engine_factory(stall_timeout=0.3)
    assert eng.health() is None
    blocker = threading.Event()
    eng.runner.prefill_steps = lambda *a, **k: iter([blocker.wait(30)])  # a prefill that hangs
    outs, done = collect(eng, Request([5, 6, 7], SamplingParams(max_tokens=3), SMALL))
    time.sleep(1.0)
    assert "no progress" in (eng.health() or "")
    eng.abort_all()
    blocker.set()
    assert done.wait(10)


# 4. device buffers are sized by the request, never by a sink/window beyond it; `full` grows as it goes
def test_a_huge_sink_and_window_allocate_only_what_the_request_uses(engine):
    att = AttentionConfig(mode="retrieval", sink=1_000_000, window=1_000_000)
    kv = kv_module.SequenceKV(engine.shape, att, 100, engine.device, torch.float32)
    assert kv.k.shape[2] <= 2 * 100 + 2 * att.evict_block  # a sink part and a window ring, each at most the request
    full = kv_module.SequenceKV(engine.shape, AttentionConfig(mode="full"), engine.max_model_len, engine.device,
                                torch.float32)
    assert all(k.shape[1] == kv_module.FULL_CHUNK < engine.max_model_len for k in full.k)


def test_full_mode_growing_its_buffer_gives_the_same_tokens(engine, long_prompt, monkeypatch):
    ids = long_prompt[:300]
    req = lambda: Request(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),  # noqa: E731
                          AttentionConfig(mode="full"))
    before = [o.token for o in engine.generate(req())]
    monkeypatch.setattr(kv_module, "FULL_CHUNK", 8)  # grows at prefill and many times while decoding
    grown = []
    real = kv_module.SequenceKV._grow
    monkeypatch.setattr(kv_module.SequenceKV, "_grow", lambda self, n: (grown.append(n), real(self, n)))
    after = [o.token for o in engine.generate(req())]
    assert after == before and len(grown) >= 2  # at the prefill and while decoding


# 7. /metrics may read a request's stores while the engine thread frees them
def test_cpu_bytes_while_the_stores_are_freed(engine, long_prompt):
    kv = kv_module.SequenceKV(engine.shape, SMALL, 400, engine.device, torch.float32)
    engine.runner.prefill(long_prompt[:300], kv)
    stores = kv.stores

    class FreedBetweenReads(kv_module.SequenceKV):
        """The engine thread frees the stores right after the first read of `stores`."""

        reads = 0

        @property
        def stores(self):
            FreedBetweenReads.reads += 1
            return stores if FreedBetweenReads.reads == 1 else None

        @stores.setter
        def stores(self, value):
            pass

    kv.__class__ = FreedBetweenReads
    assert kv.cpu_bytes() > 0  # one consistent read; reading twice would sum over None
    assert kv.cpu_bytes() == 0


# 8. a failed prefill leaves no index build running or queued
def test_a_failed_prefill_waits_for_its_queued_builds(engine, long_prompt):
    runner = ModelRunner(engine.model)
    runner.pool = ThreadPoolExecutor(2)
    kv = kv_module.SequenceKV(engine.shape, SMALL, 400, engine.device, torch.float32)
    running, finished = [], []
    for store in kv.stores:
        real = store.build

        def slow(*a, real=real):
            running.append(1)
            time.sleep(0.05)
            real(*a)
            finished.append(1)

        store.build = slow

    def fail_at(l):
        if l == 12:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        runner.prefill(long_prompt[:300], kv, on_layer=fail_at)
    settled = len(finished)
    time.sleep(0.3)
    assert len(running) == len(finished) == settled, "a build ran on after its prefill failed"
    runner.pool.shutdown()


# 8b. a prefill that fails while placing a layer leaves no copy reading its K/V buffers
def test_a_prefill_failing_mid_layer_waits_for_its_copies(engine, long_prompt, monkeypatch):
    """The copies of a layer's K/V to the CPU stores run in a pool (as on CUDA); the graph input of a later
    layer fails after that layer's copy was queued. When the prefill raises, no copy is still running
    (it would read freed device memory on CUDA) and none starts later."""
    from engine import model_runner

    runner = ModelRunner(engine.model)
    runner.pool = ThreadPoolExecutor(2)
    kv = kv_module.SequenceKV(engine.shape, SMALL, 400, engine.device, torch.float32)
    started, finished, calls = [], [], []
    write, knn = model_runner.write_rows, kv_module.graph_knn_later

    def slow_write(*a):
        started.append(1)
        time.sleep(0.2)
        write(*a)
        finished.append(1)

    def failing_knn(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory")
        return knn(*a)

    monkeypatch.setattr(model_runner, "write_rows", slow_write)
    monkeypatch.setattr(kv_module, "graph_knn_later", failing_knn)
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.prefill(long_prompt[:300], kv)
    settled = len(started)
    assert settled == len(finished) >= 2, "a copy ran on after its prefill failed"
    time.sleep(0.5)
    assert len(started) == settled, "a copy started after its prefill failed"
    runner.pool.shutdown()


# 9. a run of invalid UTF-8 never makes detokenising quadratic
def test_a_run_of_replacement_characters_detokenises_in_linear_time(engine):
    tok = engine.tokenizer
    bad = next(i for i in range(256, 0, -1) if tok.decode([i]) == "\ufffd")  # a lone continuation byte
    decoded = [0]

    class Counting:
        def decode(self, ids, **kw):
            decoded[0] += len(ids)
            return tok.decode(ids, **kw)

    d = IncrementalDetokenizer(Counting())
    n = 2000
    text = "".join(d.add(bad)[0] for _ in range(n)) + d.flush()
    assert text.count("\ufffd") >= n - 8
    assert decoded[0] < 16 * n, f"{decoded[0]} token decodes for {n} tokens"


def byte_level_tokens(tok) -> dict[int, int]:
    """Byte -> id of its single-byte token in a GPT-2 style byte-level vocabulary (GPT-2's byte-to-unicode map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return {b: tok.convert_tokens_to_ids(c) for b, c in chars.items()}


def test_a_valid_character_after_an_invalid_byte_survives(engine):
    tok = engine.tokenizer
    byte_token = byte_level_tokens(tok)
    ids = [byte_token[b] for b in b"\x80" + "\U0001F600".encode()]  # an invalid byte, then a 4-byte emoji
    d = IncrementalDetokenizer(tok)
    assert "".join(d.add(t)[0] for t in ids) + d.flush() == "\ufffd\U0001F600"
    d = IncrementalDetokenizer(tok)  # generation that ends inside a character still returns its bytes
    assert "".join(d.add(t)[0] for t in ids[:3]) + d.flush() == "\ufffd\ufffd"


# --request-timeout: out of time while decoding, or before the first token, ends as 'length'
def test_request_timeout_ends_decoding_as_length_and_frees_it(engine, long_prompt, monkeypatch):
    t = time.monotonic()
    engine.generate(Request(long_prompt[:300], SamplingParams(max_tokens=1), SMALL))
    timeout = 2 * (time.monotonic() - t) + 1.0  # room for a first token and more, on any machine
    monkeypatch.setattr(engine.config, "request_timeout", timeout)
    t = time.monotonic()
    outs = engine.generate(Request(long_prompt[:300], SamplingParams(max_tokens=5000, ignore_eos=True), SMALL))
    assert outs[-1].finish_reason == "length" and 0 < len(outs) - 1 < 5000
    assert time.monotonic() - t < timeout + 1.0
    assert wait_until(lambda: engine.num_running == 0 and engine.cpu_kv_bytes() == 0)
    monkeypatch.setattr(engine.scheduler, "max_num_seqs", 1)  # the second one waits behind the first
    blocker = collect(engine, Request(long_prompt[:300], SamplingParams(max_tokens=5000, ignore_eos=True), SMALL))
    waiting = collect(engine, Request(long_prompt[:300], SamplingParams(max_tokens=5), SMALL))
    assert waiting[1].wait(timeout + 15) and blocker[1].wait(timeout + 15)
    assert [(o.token, o.finish_reason) for o in waiting[0]] == [(None, "length")]


def test_abort_during_prefill_stops_at_the_next_chunk(engine, long_prompt, monkeypatch):
    seen = []  # what the prefill yielded (layers done), in order
    real = engine.runner.prefill_steps
    rid = "abort-in-prefill"

    def spy(*a, **k):
        gen = real(*a, **k)
        try:
            while True:
                done = next(gen)
                seen.append(done)
                if done == 3:
                    engine.abort(rid)
                yield done
        except StopIteration as e:
            return e.value
        finally:
            gen.close()

    monkeypatch.setattr(engine.runner, "prefill_steps", spy)
    outs = engine.generate(Request(long_prompt, SamplingParams(max_tokens=5), SMALL, request_id=rid))
    assert [(o.token, o.finish_reason) for o in outs] == [(None, "abort")]
    assert seen[-1] == 3 and seen.count(3) == 1  # no chunk of work after the abort


def test_prefill_progress_is_logged_with_the_request_id(engine, long_prompt, monkeypatch, caplog):
    monkeypatch.setattr(llm_engine, "PROGRESS_LOG_S", 0.0)
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="rattn.engine"):
        engine.generate(Request(long_prompt[:300], SamplingParams(max_tokens=2), SMALL, request_id="trace-42-0"))
    lines = [r for r in caplog.records if "prefill" in r.getMessage()]
    assert len(lines) >= engine.shape.n_layers
    assert f"{engine.shape.n_layers}/{engine.shape.n_layers} layers of 300 tokens" in lines[-1].getMessage()
    assert all(r.request_id == "trace-42-0" for r in lines)


def test_the_final_flush_never_emits_a_stop_string(engine):
    tok = engine.tokenizer
    token = 10003  # a whole character and the first byte of the next one
    whole = tok.decode([token])[0]
    assert tok.decode([token]).endswith("\ufffd")
    d = IncrementalDetokenizer(tok, [whole])
    assert d.add(token) == ("", False)
    assert whole not in d.flush()
