"""A request's stores and indexes die with it: 10 requests in a row leave memory flat."""
import gc
import resource
import threading
import weakref

from engine.attention import AttentionConfig
from engine.sampling import SamplingParams
from engine.sequence import Request


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_requests_in_a_row_leave_memory_flat(engine, long_prompt):
    ids = long_prompt[:120]  # short: the test is about many requests, not their length (10 tokens: one eviction each)
    att = AttentionConfig(mode="retrieval", sink=16, window=32, evict_block=8)
    live = []  # weak references to each request's KV, taken while it runs

    def run():
        done = threading.Event()

        def on(o):
            if not live or live[-1][0] != o.request_id:
                live.append((o.request_id, weakref.ref(engine.kv_of(o.request_id)), engine.cpu_kv_bytes()))
            if o.finish_reason:
                assert o.finish_reason in ("stop", "length"), o.error
                done.set()

        engine.submit(Request(ids, SamplingParams(max_tokens=10, temperature=0), att), on)
        assert done.wait(120)

    for _ in range(2):
        run()
    gc.collect()
    base = rss_mb()
    for _ in range(8):
        run()
    gc.collect()
    grown = rss_mb() - base
    assert len(live) == 10 and all(b > 0 for _, _, b in live)  # each request really had a CPU store
    assert engine.cpu_kv_bytes() == 0
    assert all(ref() is None for _, ref, _ in live), "a request's SequenceKV outlived it"
    assert grown < 10, f"resident memory grew {grown:.1f} MB over 8 requests"
