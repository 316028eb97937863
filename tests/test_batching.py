"""Many requests in one decode step: each gets exactly what it gets alone, whatever shares its step."""
import threading
from dataclasses import replace

import pytest

from engine import model_runner
from engine.attention import AttentionConfig
from engine.sampling import SamplingParams
from engine.sequence import Request

SMALL = dict(sink=16, window=32, evict_block=8)
TOKENS = 18  # past two evictions (evict_block 8); every request shares every step (run_together)
# modes, retrieval sizes, static parts and sampling settings that differ within one batch
MIXES = [
    (AttentionConfig(mode="retrieval", **SMALL), SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)),
    (AttentionConfig(mode="full"), SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)),
    (AttentionConfig(mode="streaming", **SMALL), SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)),
    (AttentionConfig(mode="flat", top_k=20, **SMALL), SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)),
    (AttentionConfig(mode="hnsw", **SMALL), SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)),
    (AttentionConfig(mode="retrieval", top_k=10, sink=4, window=64, evict_block=16),
     SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)),
    (AttentionConfig(mode="retrieval", **SMALL).override(dtype="int8"),  # int8 rows, packed at eviction
     SamplingParams(max_tokens=TOKENS, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)),
    (AttentionConfig(mode="flat", **SMALL).override(dtype="bf16"),  # a store of another dtype: a call of its own
     SamplingParams(max_tokens=TOKENS, temperature=0, frequency_penalty=0.5, ignore_eos=True)),
]


def requests(long_prompt, tag):
    # prompts of different lengths, so sequences sit at different positions in every step; different lengths
    # of output, so the batch shrinks one request at a time
    return [Request(long_prompt[: 100 + 30 * i], replace(sp, max_tokens=TOKENS + 2 * i), att, request_id=f"{tag}-{i}")
            for i, (att, sp) in enumerate(MIXES)]


def run_together(engine, reqs, monkeypatch, on_each=None, seqs=None):
    """Submit every request; decoding starts once all of them have prefilled (else the first would finish
    while the last prefill: how many share a step would depend on the machine's speed)."""
    real_step, opened, submitted = engine._decode_step, [], threading.Event()

    def step(batch):
        sched = engine.scheduler  # all are in, or none is left to come (one ended early: the test will say)
        if opened or len(batch) == len(reqs) or (submitted.is_set() and not (sched.waiting or sched.prefilling)):
            opened.append(True)
            real_step(batch)

    monkeypatch.setattr(engine, "_decode_step", step)
    outs = {r.request_id: [] for r in reqs}
    done = threading.Semaphore(0)
    running = []

    def cb(o):
        outs[o.request_id].append(o)
        running.append(engine.num_running)
        if on_each is not None:
            on_each(o)
        if o.finish_reason:
            done.release()

    for r in reqs:
        seq = engine.submit(r, cb)
        if seqs is not None:
            seqs[r.request_id] = seq
    submitted.set()
    for _ in reqs:
        assert done.acquire(timeout=300)
    return outs, max(running)


@pytest.fixture(scope="module")
def alone(engine, long_prompt):
    """Each request run by itself: the reference."""
    return [[o.token for o in engine.generate(r)] for r in requests(long_prompt, "alone")]


def no_device_rows_held(engine) -> bool:
    fixed = engine.pools.fixed  # the CUDA graphs' pool keeps its memory, never its rows
    return all(p.rows == 0 and p.k is None for p in engine.pools.pools.values()) and (fixed is None or fixed.rows == 0)


def test_batched_greedy_and_seeded_outputs_equal_each_run_alone(engine, long_prompt, alone, monkeypatch):
    reqs = requests(long_prompt, "batch")
    sizes = []  # sequences per decode step, as the runner saw them
    real = engine.runner.decode_batch
    searched = []  # per step: its requests with flat or graph stores that hold keys
    monkeypatch.setattr(engine.runner, "decode_batch", lambda *a, **k: (
        sizes.append(len(a[2])), searched.append(sum(kv.batchable and kv.n_offloaded > 0 for kv in a[2])),
        real(*a, **k))[2])
    calls = []  # (layer, requests) of each native lookup call
    real_lookups = model_runner.attend_batch
    monkeypatch.setattr(model_runner, "attend_batch",
                        lambda desc, l, req, *a: (calls.append((len(sizes), l, len(req))),
                                                  real_lookups(desc, l, req, *a))[1])
    outs, most = run_together(engine, reqs, monkeypatch)
    assert most == 8 and max(sizes) == 8, f"at most {max(sizes)} sequences shared a step: this did not test batching"
    # the flat and graph stores of every request in a step (5 of the 8 here) are searched in one call per layer
    # and store dtype (float32: 3 of them, bf16: 1, int8: 1)
    per_layer = {}  # (step, layer) -> requests in each call
    for step, l, n in calls:
        per_layer.setdefault((step, l), []).append(n)
    assert all(sum(ns) == searched[step - 1] and len(ns) <= 3 for (step, _), ns in per_layer.items())
    assert max(sum(ns) for ns in per_layer.values()) >= 3  # several requests in one call (>= 6 shared a step)
    for r, ref in zip(reqs, alone):
        got = outs[r.request_id]
        assert got[-1].finish_reason == "length", got[-1].error
        assert [o.token for o in got] == ref, f"{r.request_id} ({r.attention.mode}) differs when batched"
    assert engine.cpu_kv_bytes() == 0 and no_device_rows_held(engine)


def test_a_disconnect_mid_batch_frees_that_request_at_once_and_changes_no_other(engine, long_prompt, alone,
                                                                                monkeypatch):
    reqs = requests(long_prompt, "drop")[:4]  # four of them: each prefill and decode costs seconds on 2 cores
    victim = reqs[0].request_id
    after = {}  # other requests' tokens since the abort: a second one comes from a later step
    freed = []

    def on_each(o):
        if o.request_id == victim and o.num_generated == 5 and not o.finish_reason:
            engine.abort(victim)  # the client is gone
            after["since"] = True
        elif "since" in after and o.request_id != victim and o.token is not None:
            after[o.request_id] = after.get(o.request_id, 0) + 1
            if after[o.request_id] == 2:
                freed.append(seqs[victim].kv is None)

    seqs = {}
    outs, _ = run_together(engine, reqs, monkeypatch, on_each, seqs)
    assert outs[victim][-1].finish_reason == "abort" and len(outs[victim]) <= 7
    assert freed and all(freed), "the KV of an aborted request outlived the next step"
    for r, ref in zip(reqs[1:], alone[1:4]):
        assert [o.token for o in outs[r.request_id]] == ref
    assert no_device_rows_held(engine)


def test_pool_rows_are_reused_lowest_first_survive_a_failed_resize_and_free_when_empty(engine, monkeypatch):
    from engine.kv import StaticPool

    pool = StaticPool(engine.shape, 8, engine.device)
    rows = [pool.alloc() for _ in range(3)]
    assert rows == [0, 1, 2] and pool.k.shape[1] == 4
    pool.release(1)
    assert pool.alloc() == 1 and pool.rows == 3  # the hole is filled first
    pool.alloc()  # row 3: the last that fits

    def no_memory(R):
        raise MemoryError("out of device memory")

    monkeypatch.setattr(pool, "_resize", no_memory)
    with pytest.raises(MemoryError):
        pool.alloc()  # row 4 needs a resize that fails
    assert pool.rows == 4 and pool.k.shape[1] == 4  # the pool is as it was
    monkeypatch.undo()
    for r in range(4):
        pool.release(r)
    assert pool.rows == 0 and pool.k is None


def test_a_batch_whose_pool_rows_are_out_of_order_decodes_each_sequence_as_alone(engine, long_prompt):
    import torch

    from engine.kv import SequenceKV, StaticPools

    att = AttentionConfig(mode="retrieval", **SMALL)
    prompts = [long_prompt[:120], long_prompt[:170], long_prompt[:220]]
    pools = StaticPools(engine.shape, engine.device)

    def kv(pools_):
        return SequenceKV(engine.shape, att, 400, engine.device, torch.float32, engine.copy_scores, pools_)

    first = kv(pools)  # row 0, freed below: the third sequence takes it, so batch order != row order
    batch = [kv(pools), kv(pools)]
    first.free()
    batch.append(kv(pools))
    alone = [kv(None) for _ in prompts]
    assert [x.row for x in batch] == [1, 2, 0]
    tokens = []
    for p, a, b in zip(prompts, batch, alone):
        la, _ = engine.runner.prefill_many(p, [a, b])  # one forward pass into both
        tokens.append(int(la.argmax()))
    for step in range(12):  # past an eviction (evict_block 8)
        pos = [len(p) + step for p in prompts]
        together = engine.runner.decode_batch(tokens, pos, batch, [att.top_k] * 3)
        each = torch.stack([engine.runner.decode(t, q, a, att.top_k) for t, q, a in zip(tokens, pos, alone)])
        torch.testing.assert_close(together, each, rtol=1e-4, atol=1e-4)
        tokens = together.argmax(-1).tolist()
    for x in batch + alone:
        x.free()
