"""Admission by host memory: the running requests' CPU stores never exceed --cpu-kv-budget."""
import threading

import pytest

from engine.attention import AttentionConfig
from engine.kv import SequenceKV, host_bytes
from engine.sampling import SamplingParams
from engine.sequence import Request

SMALL = AttentionConfig(mode="retrieval", sink=16, window=32, evict_block=8)


def allocated(kv: SequenceKV) -> int:
    """Every host array a request's KV holds: stores (keys, values, links, search scratch), occurrences,
    eviction buffers."""
    arrays = [kv.evict_k, kv.evict_v]  # tensors (rows of the store's format); the rest are numpy arrays
    if kv.occ is not None:
        arrays += [kv.occ.tokens, kv.occ.by_token, kv.occ.sorted]
    for st in kv.stores:
        arrays += [st.K, st.V, st.visited, st.stamps, st.cs, st.ci, st.cl] + (
            [st.adj, st.entries] if st.kind == "graph" else [])
    return sum(a.nbytes for a in arrays)


@pytest.mark.parametrize("prompt,max_tokens,att", [
    (400, 40, SMALL),
    (1200, 40, SMALL),  # past the 1024 keys a store starts with
    (10, 1500, SMALL),  # a prompt shorter than the sink: its slots stay empty, more can leave the device
    (400, 40, SMALL.override(top_k=3000, dtype="bf16")),
    (1200, 40, SMALL.override(dtype="int8")),
])
def test_host_bytes_bound_what_a_request_allocates(engine, long_prompt, prompt, max_tokens, att):
    kv = SequenceKV(engine.shape, att, prompt + max_tokens, engine.device, engine.model.dtype, engine.copy_scores)
    try:
        engine.runner.prefill(long_prompt[:prompt], kv)  # reserves the store for the whole request
        kv.describe()
        # room for every key that can leave the device (a store that has been described never grows)
        assert all(st.capacity >= prompt + max_tokens - min(att.sink, prompt) - att.window for st in kv.stores)
        need = host_bytes(engine.shape, att, prompt, prompt + max_tokens)
        assert allocated(kv) <= need <= 1.5 * allocated(kv)
    finally:
        kv.free()
    assert host_bytes(engine.shape, AttentionConfig(mode="streaming"), 10, 10_000) == 0  # nothing leaves the device


def test_a_request_that_can_never_fit_is_refused_with_both_numbers(engine, monkeypatch):
    need = host_bytes(engine.shape, SMALL, 899, 1000)
    monkeypatch.setattr(engine.scheduler, "host_budget", need - 1)
    with pytest.raises(ValueError, match=r"may need [\d.]+ MiB of host memory.*budget of [\d.]+ MiB"):
        engine.submit(Request(list(range(1, 900)), SamplingParams(max_tokens=101), SMALL), lambda o: None)
    assert engine.tokens_that_fit(899, SMALL) == 100  # what a request that asks for no number may generate
    # the same prompt in streaming mode keeps nothing on the CPU: it is admitted and runs
    out = list(engine.stream(Request(list(range(1, 900)), SamplingParams(max_tokens=2), AttentionConfig(
        mode="streaming", sink=16, window=32, evict_block=8))))
    assert out[-1].finish_reason == "length"


def test_a_request_that_fits_later_waits_for_the_memory(engine, long_prompt, monkeypatch):
    reqs = [Request(long_prompt[:400 + 10 * i], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), SMALL,
                    request_id=f"adm-{i}") for i in range(2)]
    monkeypatch.setattr(engine.scheduler, "host_budget", host_bytes(engine.shape, SMALL, 410, 422) * 3 // 2)
    running, done = [], threading.Semaphore(0)  # the budget holds one of them at a time

    def cb(o):
        running.append(engine.num_running)
        if o.finish_reason:
            done.release()

    for r in reqs:
        engine.submit(r, cb)
    assert done.acquire(timeout=120) and done.acquire(timeout=120)
    assert max(running) == 1 and len(running) == 24  # both ran to the end, one after the other
