"""Every attention mode runs the same decode path: with top_k covering every offloaded key, the CPU
modes must reproduce full attention."""
import pytest
import torch

from engine.attention import AttentionConfig
from engine.kv import SequenceKV
from engine.sampling import SamplingParams
from engine.sequence import Request

ALL = 10**6
PAST = 40  # decode steps past the window: two evictions of 16 tokens
SMALL = dict(sink=16, window=64, evict_block=16)  # tokens slide out during decoding, into the store and its index
FORK = {"full": AttentionConfig(mode="full"), "streaming": AttentionConfig(mode="streaming"),
        **{m: AttentionConfig(mode=m, top_k=ALL) for m in ("flat", "hnsw", "retrieval")},
        **{f"small-{m}": AttentionConfig(mode=m, top_k=ALL, **SMALL) for m in ("flat", "retrieval")},
        "occ": AttentionConfig(mode="retrieval", **SMALL).override(exact_max=0)}


@pytest.fixture(scope="module")
def fork(engine, long_prompt):
    """The long prompt prefilled once into every configuration below (the benchmarks' fork: one forward
    pass, each configuration's own placement; a 1,250-token prefill is most of a test's time on 2 cores).
    -> (logits, {name: (SequenceKV, PrefillStats)}); each is decoded by one test only."""
    kvs = {name: SequenceKV(engine.shape, att, len(long_prompt) + PAST, engine.device, engine.model.dtype,
                            engine.copy_scores if name == "occ" else None) for name, att in FORK.items()}
    logits, stats = engine.runner.prefill_many(long_prompt, list(kvs.values()))
    yield logits, {name: (kv, st) for (name, kv), st in zip(kvs.items(), stats)}
    for kv in kvs.values():
        kv.free()


def decode(engine, long_prompt, fork, name: str, steps: int):
    """Greedy decoding of a forked configuration -> (tokens, logits: the prefill's and each step's, stats)."""
    logits, kvs = fork
    kv, stats = kvs.pop(name)  # decoded once: a second decode of it would start from a moved position
    tokens, out = [], [logits]
    for i in range(steps):
        tokens.append(int(torch.argmax(logits)))
        logits = engine.runner.decode(tokens[-1], len(long_prompt) + i, kv, FORK[name].top_k)
        out.append(logits)
    return tokens, out, stats


@pytest.fixture(scope="module")
def full_run(engine, long_prompt, fork):
    return decode(engine, long_prompt, fork, "full", PAST)


@pytest.mark.parametrize("mode", ["flat", "hnsw", "retrieval"])
def test_cpu_modes_with_all_keys_equal_full(engine, long_prompt, fork, full_run, mode):
    tokens, logits, stats = decode(engine, long_prompt, fork, mode, 12)
    assert stats.offloaded == len(long_prompt) - 128 - 512  # the middle really went to the CPU store
    assert tokens == full_run[0][:12]
    for a, b in zip(logits, full_run[1]):
        assert torch.linalg.vector_norm(a - b) <= 1e-4 * torch.linalg.vector_norm(b)


@pytest.mark.parametrize("mode", ["flat", "retrieval"])
def test_generation_past_the_window_stays_exact(engine, long_prompt, fork, full_run, mode):
    kv = fork[1][f"small-{mode}"][0]
    n0 = kv.offloaded_tokens()
    tokens, _, _ = decode(engine, long_prompt, fork, f"small-{mode}", PAST)
    assert kv.offloaded_tokens() > n0  # evicted tokens were inserted
    assert kv.take_insert_seconds() > 0 and kv.take_insert_seconds() == 0  # their time, counted once
    assert tokens == full_run[0]


def test_streaming_mode_differs_from_full_on_long_prompt(engine, long_prompt, fork, full_run):
    """The lower baseline really drops the middle of the context (else the comparison means nothing)."""
    _, logits, _ = decode(engine, long_prompt, fork, "streaming", 1)  # (the fork shares full's exact prefill)
    assert not torch.allclose(logits[1], full_run[1][1], rtol=1e-3)


def test_submit_api_runs_every_mode(engine):
    ids = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    for mode in ("full", "streaming", "flat", "hnsw", "retrieval"):
        att = AttentionConfig(mode=mode, sink=4, window=8, evict_block=4)
        outs = engine.generate(Request(ids, SamplingParams(max_tokens=8, temperature=0), att))
        assert outs[-1].finish_reason in ("stop", "length"), outs[-1].error
        assert "".join(o.text for o in outs).strip()


def test_context_limit_is_enforced(engine):
    with pytest.raises(ValueError, match="maximum context length"):
        engine.submit(Request([1] * 100, SamplingParams(max_tokens=engine.max_model_len)), lambda o: None)


def test_token_index_follows_every_offloaded_key(engine, long_prompt, fork):
    """Copying heads past exact_max look keys up by token: the index must name each key's token, also
    for keys evicted during decoding."""
    kv = fork[1]["occ"][0]
    tokens, _, _ = decode(engine, long_prompt, fork, "occ", PAST)
    seq, n = long_prompt + tokens, kv.offloaded_tokens()
    assert n > len(long_prompt) - 16 - 64 and kv.occ.n == n
    assert kv.occ.tokens[:n].tolist() == seq[16:16 + n]
    hits = kv.occ.of(seq[100])
    assert len(hits) and all(seq[16 + i] == seq[100] for i in hits.tolist())


def test_prefill_through_host_chunks_equals_prefill_on_device(engine, long_prompt):
    """A long prompt's hidden states live in host memory and pass through a ring of device chunk buffers
    (forced here, with chunks small enough that the ring wraps within a layer and across layers): the
    same logits and stores as hidden states kept whole. And the benchmarks' local prefill attention
    changes nothing when its window reaches back past the prompt's start, and changes the result when not."""
    runner, att = engine.runner, AttentionConfig(mode="flat", sink=16, window=64)
    chunk, ids = runner.chunk, long_prompt[:300]

    def prefill(host: bool, window: int = 0, size: int = 64):  # 5 chunks: the ring holds 3
        kv = SequenceKV(engine.shape, att, len(ids) + 1, engine.device, engine.model.dtype)
        runner.chunk, runner.prefill_window = size, window
        runner.hidden_device_bytes = 0 if host else float("inf")
        try:
            logits, _ = runner.prefill(ids, kv)
        finally:
            runner.chunk, runner.prefill_window, runner.hidden_device_bytes = chunk, 0, float("inf")
        keys = kv.stores[5].kv_rows(kv.stores[5].n)[0].clone()
        kv.free()
        return logits, keys

    logits, keys = prefill(False)
    logits_host, keys_host = prefill(True)
    assert torch.equal(logits, logits_host) and torch.equal(keys, keys_host)
    # one chunk: the next layer's copy of it waits for this layer's result
    assert torch.equal(prefill(True, size=1024)[0], prefill(False, size=1024)[0])
    assert torch.equal(prefill(True, window=len(ids))[0], logits)
    assert not torch.allclose(prefill(True, window=200)[0], logits, atol=1e-3)


@pytest.mark.parametrize("mode", ["retrieval", "flat"])  # a job per graph; a build that waits for its copy
def test_prefill_with_copies_and_builds_in_threads_equals_inline(engine, long_prompt, mode, monkeypatch):
    """On CUDA a layer's copies to the CPU stores and its graph builds (one job per graph) run in a pool of
    threads while the next layer fills a second K/V pair. Here the same with a pool on the CPU (with chunks
    small enough that each layer has several, and copies slow enough that a layer two later would overwrite
    the pair they read if it did not wait for them): every store's keys, values and graph, and the logits,
    equal the inline prefill's."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from engine import model_runner

    runner, att = engine.runner, AttentionConfig(mode=mode, sink=16, window=64)
    ids, inline, chunk = long_prompt[:500], runner.pool, runner.chunk

    def prefill():
        kv = SequenceKV(engine.shape, att, len(ids) + 1, engine.device, engine.model.dtype)
        runner.chunk = 128
        try:
            logits, stats = runner.prefill(ids, kv)
        finally:
            runner.chunk = chunk
        got = [(*(t.clone() for t in s.kv_rows(s.n)), s.adj[:, :s.n].copy() if s.kind == "graph" else None)
               for s in kv.stores]
        kv.free()
        return logits, got, stats

    logits, stores, _ = prefill()
    write = model_runner.write_rows
    monkeypatch.setattr(model_runner, "write_rows", lambda *a: (time.sleep(0.25), write(*a)))
    with ThreadPoolExecutor(3) as pool:
        runner.pool = pool
        try:
            assert len(runner._prefill_kv(8, True)) == 2  # the pair the next layer fills while copies read one
            logits_t, stores_t, stats = prefill()
        finally:
            runner.pool = inline
    assert torch.equal(logits, logits_t) and stats.offloaded == len(ids) - 16 - 64
    for (k, v, adj), (k_t, v_t, adj_t) in zip(stores, stores_t):
        assert torch.equal(k, k_t) and torch.equal(v, v_t)
        assert (adj is None) == (mode != "retrieval") and (adj is None or (adj == adj_t).all())


@pytest.mark.parametrize("mode", ["retrieval", "streaming"])
def test_a_new_document_entry_filled_by_jobs_equals_inline(engine, long_prompt, mode, monkeypatch):
    """A prompt that makes a document-cache entry: its host K/V (sink and tail, or every token where the mode
    has no stores) and its stores are filled by jobs in a pool of threads (as on CUDA, off the engine
    thread), with the copies slowed down. The entry equals the one an inline prefill makes."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    import index.store
    from engine.doc_cache import DocEntry

    runner, att = engine.runner, AttentionConfig(mode=mode, sink=16, window=64)
    ids, inline = long_prompt[:500], runner.pool

    def prefill():
        e = DocEntry((mode,), np.asarray(ids, np.int64))
        kv = SequenceKV(engine.shape, att, len(ids) + 1, engine.device, engine.model.dtype, new_entry=e)
        logits, _ = runner.prefill(ids, kv)
        kv.free()
        rows = [s.kv_rows(s.n) for s in e.stores] if e.stores is not None else []
        return logits, [e.sink_k, e.sink_v, e.tail_k, e.tail_v, *(t for r in rows for t in r)]

    logits, got = prefill()
    write_rows = index.store.write_rows
    slow = lambda *a: (time.sleep(0.02), write_rows(*a))  # noqa: E731
    monkeypatch.setattr("engine.model_runner.write_rows", slow)
    with ThreadPoolExecutor(3) as pool:
        runner.pool = pool
        try:
            logits_t, got_t = prefill()
        finally:
            runner.pool = inline
    assert torch.equal(logits, logits_t) and len(got) == len(got_t) == (4 if mode == "streaming" else 4 + 60)
    assert got[2].shape[2] == (len(ids) if mode == "streaming" else 64)
    for a, b in zip(got, got_t):
        assert torch.equal(a, b)
