"""The document cache: a prompt that begins with a cached document reuses its K/V and index, answers as
the same prompt uncached, and the cache keeps to its budget without dropping an entry in use."""
import threading

import numpy as np
import pytest
import torch

from engine.attention import AttentionConfig
from engine.doc_cache import BLOCK, DocCache, DocEntry
from engine.llm_engine import Engine, EngineConfig
from engine.sampling import SamplingParams
from engine.sequence import Request

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def entry(tokens, nbytes) -> DocEntry:
    """An entry of `tokens` that takes about nbytes (host tensors only: what the cache counts)."""
    e = DocEntry(("raw",), np.asarray(tokens, np.int64))
    e.size(1, 1, max(1, nbytes // 8), torch.float32, 0, 1)
    return e


def made(cache: DocCache, tokens, nbytes) -> DocEntry | None:
    e = entry(tokens, nbytes)
    need = e.measure()
    if not cache.reserve(need, room=10**18):
        return None
    assert cache.insert(e, need)
    return e


def test_lookup_finds_the_longest_block_prefix_of_at_least_half_the_prompt():
    cache = DocCache(10**9)
    doc = list(range(1000, 3000))
    e = made(cache, doc + [1, 2, 3], 10_000)
    cache.release(e)
    hit, c = cache.lookup(("raw",), doc + [7, 8, 9])  # same document, another question
    assert hit is e and c == len(doc) // BLOCK * BLOCK and e.refs == 1
    cache.release(hit)
    assert cache.lookup(("graph",), doc + [7]) == (None, 0)  # another placement: another key
    assert cache.lookup(("raw",), doc[:100] + list(range(5000, 8000)))[0] is None  # shares less than half
    hit, c = cache.lookup(("raw",), doc[:1000])  # the whole prompt cached: its last token is still prefilled
    assert hit is e and c == 960 and c < 1000
    cache.release(hit)
    s = cache.stats()
    assert (s.hits, s.misses) == (2, 2)


def test_budget_is_never_exceeded_and_an_entry_in_use_is_never_evicted():
    size = entry(range(200), 4_000).measure()
    cache = DocCache(2 * size + size // 2)  # room for two entries
    a = made(cache, range(0, 200), 4_000)  # in use by the request that made it
    b = made(cache, range(500, 700), 4_000)
    cache.release(b)
    # room for a third only by evicting the unused one (b), never the one in use (a)
    c = made(cache, range(900, 1100), 4_000)
    assert c is not None and b not in cache._entries and cache.stats().evictions == 1
    assert cache.lookup(("raw",), list(range(500, 700)))[0] is None  # b is gone
    assert made(cache, range(2000, 2200), 4_000) is None  # a and c in use: no room, nothing evicted
    assert cache.stats().bytes <= cache.budget and cache.stats().entries == 2
    cache.release(a)
    assert made(cache, range(2000, 2200), 4_000) is not None  # now a makes room
    assert cache.stats().bytes <= cache.budget and cache.stats().evictions == 2


@pytest.fixture(scope="module")
def cached_engine():
    eng = Engine(EngineConfig(device="cpu", dtype="float32", doc_cache_gb=1.0))
    yield eng
    eng.shutdown()


def tokens(outs):
    return [o.token for o in outs if o.token is not None]


@pytest.fixture(scope="module")
def uncached(engine, long_prompt):
    """The greedy tokens of document + second question without the cache, in `full` (the session's engine):
    the reference of both modes below. For `flat` over every key that rests on flat giving full's tokens
    (test_engine_modes checks it on another prompt); a mismatch there fails this test without a cache fault."""
    assert engine.doc_cache is None
    doc, q2 = long_prompt[:1100], long_prompt[200:800]
    return tokens(engine.generate(Request(doc + q2, GREEDY, AttentionConfig(mode="full"))))


@pytest.mark.parametrize("att", [AttentionConfig(mode="flat", top_k=10**6), AttentionConfig(mode="full")],
                         ids=["flat-all", "full"])
def test_a_cached_document_answers_as_the_same_prompt_uncached(cached_engine, uncached, long_prompt, att):
    """A new question on a cached document: the document's tokens are not prefilled again, and the greedy
    tokens are those of the same prompt in an engine without the cache (`uncached`). The second question
    is longer than the window, so the request's own store holds keys too (some copied from the entry's
    window, the rest prefilled), searched beside the entry's."""
    doc, q1, q2 = long_prompt[:1100], long_prompt[-40:], long_prompt[200:800]  # two endings of one document
    first = cached_engine.generate(Request(doc + q1, GREEDY, att))
    assert first[-1].num_cached_tokens == 0
    parts = []

    def on_output(o):
        kv = cached_engine.kv_of(o.request_id)
        if kv is not None and not parts:
            parts.append((kv.cached_n, kv.n_offloaded))
        outs.append(o)

    outs = []
    done = threading.Event()
    cached_engine.submit(Request(doc + q2, GREEDY, att), lambda o: (on_output(o), o.finish_reason and done.set()))
    assert done.wait(300)
    second = outs
    assert second[-1].num_cached_tokens == len(doc) // BLOCK * BLOCK
    if att.mode == "flat":
        assert parts[0][0] > 0 and parts[0][1] > 0  # keys in both parts
    assert tokens(second) == uncached
    assert not any(e.refs for e in cached_engine.doc_cache._entries)  # both requests let go of it


def test_retrieval_reuses_the_index_and_aborts_release_their_references(cached_engine, long_prompt):
    att = AttentionConfig(mode="retrieval")
    doc = long_prompt[:1100]
    cached_engine.generate(Request(doc + [42] * 30, GREEDY, att))
    entry = next(e for e in cached_engine.doc_cache._entries if e.key[0] == "graph")
    started = threading.Event()
    outs = []

    def on_output(o):
        outs.append(o)
        if o.token is not None:
            started.set()

    req = Request(doc + [43] * 70, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), att)
    seq = cached_engine.submit(req, on_output)
    assert started.wait(120)
    kv = cached_engine.kv_of(req.request_id)
    assert kv.cached is entry and kv.cached_n > 0 and entry.refs == 1  # its keys are searched in the entry
    cached_engine.abort(req.request_id)
    for _ in range(600):
        if outs and outs[-1].finish_reason:
            break
        threading.Event().wait(0.1)
    assert outs[-1].finish_reason == "abort" and seq.kv is None and entry.refs == 0
    assert outs[-1].num_cached_tokens == 1100 // BLOCK * BLOCK


def test_a_view_of_a_prefix_of_a_graph_finds_keys_where_its_entry_points_lie_beyond():
    """A request that sees only the first keys of a cached document's store: the graph's entry points may
    all lie past them; the walk then starts from keys it can see and still finds the best ones."""
    from index import NO_DESC, BatchScratch, IndexParams, OffloadedStore, attend_batch, exact_topk, request_row

    rng = np.random.default_rng(0)
    G, H, d, n, k = 1, 2, 16, 4000, 8
    K = rng.standard_normal((G, n, d), dtype=np.float32)
    q = rng.standard_normal((1, H, d), dtype=np.float32)
    store = OffloadedStore("graph", G, H, d, IndexParams(), capacity=n)
    store.load(K, K, exact_topk(rng.standard_normal((64, d), dtype=np.float32), K[0], 16)[None])
    store.entries[:] = np.arange(3000, 3000 + store.entries.shape[1])  # every entry point beyond the view
    visible = 1000
    o, ms = np.zeros((1, H, d), np.float32), np.zeros((1, 2, H), np.float32)
    attend_batch(np.stack([NO_DESC, store.describe()])[None, :, None], 0,
                 request_row(0, k, [np.zeros(6, np.int64), store.part(k, visible, None)])[None], G, 1.0, q, o, ms,
                 np.float32, BatchScratch(d))
    scores = K[0, :visible] @ q[0].T  # (visible, H)
    assert (ms[0, 1] > 0).all()  # keys found (none: m = -inf, s = 0)
    assert (ms[0, 0] >= np.percentile(scores, 98, axis=0)).all()  # and good ones (m: the best it attended)


def test_occurrences_of_a_visible_prefix():
    from engine.kv import Occurrences

    occ = Occurrences(100, limit=3)
    occ.extend(np.array([5, 7, 5, 5, 9, 5, 5]))  # 5 at ids 0, 2, 3, 5, 6
    assert occ.of(5).tolist() == [3, 5, 6]  # the most recent 3
    assert occ.of(5, below=4).tolist() == [0, 2, 3]  # the most recent 3 a view of ids < 4 can use


def test_an_entry_being_made_is_given_up_with_its_request(cached_engine, long_prompt):
    """A request aborted in its prefill leaves no entry and no bytes reserved."""
    att = AttentionConfig(mode="retrieval")
    before = cached_engine.doc_cache.stats()
    outs = []
    req = Request([5] * 64 + long_prompt[:1100], GREEDY, att)  # a first block no entry has: nothing to reuse
    cached_engine.submit(req, outs.append)
    for _ in range(600):  # abort once its prefill has begun
        if cached_engine.prefill_done > 0:
            break
        threading.Event().wait(0.01)
    making = cached_engine.doc_cache.stats().reserved
    cached_engine.abort(req.request_id)
    for _ in range(600):
        if outs and outs[-1].finish_reason:
            break
        threading.Event().wait(0.1)
    after = cached_engine.doc_cache.stats()
    assert making > 0  # it was making an entry
    assert outs[-1].finish_reason == "abort" and outs[-1].token is None
    assert after.reserved == 0 and after.entries == before.entries


def test_unused_entries_make_room_for_a_request(cached_engine, long_prompt, monkeypatch):
    """The cache's entries count against the requests' host budget; an unused one is evicted when a new
    request needs its room."""
    from engine.kv import host_bytes

    att = AttentionConfig(mode="flat", top_k=64)
    cached_engine.generate(Request(long_prompt[:1050] + [11] * 40, GREEDY, att))
    cache = cached_engine.doc_cache
    assert cache.stats().entries >= 1 and all(e.refs == 0 for e in cache._entries)
    other = [7] * 10 + long_prompt[100:1150]  # nothing to reuse
    need = host_bytes(cached_engine.shape, att, len(other), len(other) + GREEDY.max_tokens)
    monkeypatch.setattr(cached_engine.scheduler, "host_budget", need + cache.held() // 2)
    evicted = cache.stats().evictions
    out = cached_engine.generate(Request(other, GREEDY, att))
    assert out[-1].finish_reason == "length" and cache.stats().evictions > evicted


def test_a_request_that_fits_only_without_its_own_entry_evicts_it_and_misses(cached_engine, long_prompt, monkeypatch):
    """Admission keeps the entry the waiting request would reuse, unless the request cannot fit beside it:
    then the entry goes and the request prefills in full (it never waits forever)."""
    from engine.kv import host_bytes

    att = AttentionConfig(mode="flat", top_k=32)  # a key of its own
    doc = [9] * 64 + long_prompt[:1000]
    cached_engine.generate(Request(doc + [12] * 30, GREEDY, att))
    cache = cached_engine.doc_cache
    ids = doc + [13] * 30
    need = host_bytes(cached_engine.shape, att, len(ids), len(ids) + GREEDY.max_tokens)
    monkeypatch.setattr(cached_engine.scheduler, "host_budget", need + cache.held() // 4)
    evicted, outs, done = cache.stats().evictions, [], threading.Event()
    cached_engine.submit(Request(ids, GREEDY, att), lambda o: (outs.append(o), o.finish_reason and done.set()))
    assert done.wait(120), "the request waited for room that only its own entry held"
    assert outs[-1].finish_reason == "length" and outs[-1].num_cached_tokens == 0
    assert cache.stats().evictions > evicted


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_an_entry_gives_back_its_prefix_as_its_stores_keep_it(fmt):
    """copy_prefix: the sink and tail as copied, the stores' keys and values unpacked from their rows
    (an int8 store's quantised values, a float32 store's exact ones)."""
    from index import IndexParams, OffloadedStore, pack
    from index.store import unpack

    g = torch.Generator().manual_seed(0)
    S, n, t, d = 4, 100, 6, 16
    k, v = torch.randn(1, 1, S + n + t, d, generator=g), torch.randn(1, 1, S + n + t, d, generator=g)
    e = DocEntry(("flat",), np.arange(S + n + t))
    e.size(1, 1, d, torch.float32, S, t)
    e.sink_k[:], e.sink_v[:] = k[..., :S, :], v[..., :S, :]
    e.tail_k[:], e.tail_v[:] = k[..., S + n:, :], v[..., S + n:, :]
    e.stores = [OffloadedStore("flat", 1, 1, d, IndexParams(dtype=fmt))]
    e.stores[0].load(k[0, :, S: S + n].numpy(), v[0, :, S: S + n].numpy(), None)
    k_out, v_out = torch.empty(S + n + t, 1, d), torch.empty(S + n + t, 1, d)
    e.copy_prefix(0, S + n + t, k_out, v_out)
    for x, out in ((k, k_out), (v, v_out)):
        want = x[0].transpose(0, 1).clone()  # (T, 1, d)
        want[S: S + n] = unpack(pack(want[S: S + n], fmt), fmt, d)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        if fmt == "int8":
            assert not torch.equal(out, x[0].transpose(0, 1))  # quantised: not the values it was given
