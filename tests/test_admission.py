"""Admission by host memory: the running requests' CPU stores never exceed --cpu-kv-budget."""
import threading

import pytest

from engine.attention import AttentionConfig
from engine.kv import host_bytes
from engine.sampling import SamplingParams
from engine.sequence import Request

SMALL = AttentionConfig(mode="retrieval", sink=16, window=32, evict_block=8)


def test_host_bytes_bound_what_a_request_stores(engine, long_prompt):
    from engine.kv import SequenceKV

    kv = SequenceKV(engine.shape, SMALL, 400 + 40, engine.device, engine.model.dtype, engine.copy_scores)
    try:
        engine.runner.prefill(long_prompt[:400], kv)
        assert 0 < kv.cpu_bytes() <= host_bytes(engine.shape, SMALL, 440)
    finally:
        kv.free()
    assert host_bytes(engine.shape, AttentionConfig(mode="streaming"), 10_000) == 0  # nothing leaves the device


def test_a_request_that_can_never_fit_is_refused_with_both_numbers(engine, monkeypatch):
    need = host_bytes(engine.shape, SMALL, 1000)
    monkeypatch.setattr(engine, "cpu_kv_budget", need - 1)
    with pytest.raises(ValueError, match=r"may need [\d.]+ MiB of host memory.*budget of [\d.]+ MiB"):
        engine.submit(Request(list(range(1, 900)), SamplingParams(max_tokens=101), SMALL), lambda o: None)
    # the same prompt in streaming mode keeps nothing on the CPU: it is admitted and runs
    out = list(engine.stream(Request(list(range(1, 900)), SamplingParams(max_tokens=2), AttentionConfig(
        mode="streaming", sink=16, window=32, evict_block=8))))
    assert out[-1].finish_reason == "length"


def test_a_request_that_fits_later_waits_for_the_memory(engine, long_prompt, monkeypatch):
    reqs = [Request(long_prompt[:400 + 10 * i], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), SMALL,
                    request_id=f"adm-{i}") for i in range(2)]
    budget = host_bytes(engine.shape, SMALL, 422) * 3 // 2  # room for one of them at a time
    monkeypatch.setattr(engine, "cpu_kv_budget", budget)
    monkeypatch.setattr(engine.scheduler, "host_budget", budget)
    running, done = [], threading.Semaphore(0)

    def cb(o):
        running.append(engine.num_running)
        if o.finish_reason:
            done.release()

    for r in reqs:
        engine.submit(r, cb)
    assert done.acquire(timeout=120) and done.acquire(timeout=120)
    assert max(running) == 1 and len(running) == 24  # both ran to the end, one after the other
