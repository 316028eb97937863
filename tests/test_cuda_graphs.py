"""The decode step replayed from CUDA graphs computes what the eager step computes (runs where CUDA is)."""
import pytest
import torch

from engine.attention import AttentionConfig
from engine.kv import SequenceKV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

STEPS = 72  # past the first eviction from the ring (a 512-token window in a 576-slot ring)


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma-3-270m"])
def gpu_engine(request):
    """Llama layers, and Gemma 3's mix of sliding-window layers (a windowed bias in the graphs) and global ones."""
    from engine.llm_engine import Engine, EngineConfig

    eng = Engine(EngineConfig(model=request.param, load_format="dummy", device="cuda", dtype="float32",
                              max_num_seqs=4))
    yield eng
    eng.shutdown()


def decode(eng, prompts, atts, graphs: bool):
    """Greedy tokens and every step's logits of the prompts decoded together."""
    eng.runner.use_graphs = graphs
    kvs = [SequenceKV(eng.shape, att, len(p) + STEPS + 1, eng.device, torch.float32, eng.copy_scores, eng.pools)
           for p, att in zip(prompts, atts)]
    try:
        tokens = [[int(eng.runner.prefill(p, kv)[0].argmax())] for p, kv in zip(prompts, kvs)]
        logits = []
        for i in range(STEPS):
            out = eng.runner.decode_batch([t[-1] for t in tokens], [len(p) + i for p in prompts], kvs,
                                          [a.top_k for a in atts])
            logits.append(out.cpu())
            for t, row in zip(tokens, out):
                t.append(int(row.argmax()))
        assert all(kv.pool is (None if kv.full else eng.pools.fixed) for kv in kvs)
        return tokens, torch.stack(logits)
    finally:
        for kv in kvs:
            kv.free()
        eng.runner.use_graphs = True


@pytest.mark.parametrize("modes", [("retrieval", "streaming", "flat"), ("streaming",), ("retrieval",),
                                   ("full", "full", "full")])
def test_graph_step_equals_eager_step(gpu_engine, modes):
    """Pooled modes replay the row graphs; `full` alone its graphs of the whole step (3 sequences in the graphs
    of 4 rows: a padding row too)."""
    g = torch.Generator().manual_seed(len(modes))
    prompts = [torch.randint(0, gpu_engine.shape.vocab_size, (1500 + 200 * i,), generator=g).tolist()
               for i in range(len(modes))]
    atts = [AttentionConfig(mode=m) for m in modes]
    assert gpu_engine.runner._graphs and (gpu_engine.runner._full_graphs or not gpu_engine.runner._fused_full), \
        "the engine captured no graphs: this would compare eager with eager"
    eager_tokens, eager_logits = decode(gpu_engine, prompts, atts, graphs=False)
    graph_tokens, graph_logits = decode(gpu_engine, prompts, atts, graphs=True)
    assert graph_tokens == eager_tokens
    rel = (graph_logits - eager_logits).abs().amax() / eager_logits.abs().amax()
    assert rel <= 1e-3, float(rel)


@pytest.mark.parametrize("lengths,chunk", [((1500, 1700, 1900), None), ((300, 700, 1100), 8)])
def test_fused_full_step_equals_sdpa_step(gpu_engine, lengths, chunk, monkeypatch):
    """`full` decoding with the fused attention kernels in graphs gives SDPA's tokens and logits. Gemma: its
    sliding-window layers' rings wrap (the kernels skip the slot being written over), or, at 300 tokens, never
    fill. With 8-token chunks the buffers grow while decoding (the tables follow them)."""
    from engine import kv as kv_module

    if chunk:
        monkeypatch.setattr(kv_module, "FULL_CHUNK", chunk)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, gpu_engine.shape.vocab_size, (n,), generator=g).tolist() for n in lengths]
    atts = [AttentionConfig(mode="full")] * 3
    runner = gpu_engine.runner
    from engine import attention_cuda
    if not attention_cuda.supported(torch.float32, gpu_engine.shape.head_dim, gpu_engine.device):
        pytest.skip("the fused kernels need Triton and an sm80+ GPU")
    assert runner._fused_full and runner._full_graphs, "the fused full step did not build here"
    fused_tokens, fused_logits = decode(gpu_engine, prompts, atts, graphs=True)
    runner._fused_full = False
    try:
        sdpa_tokens, sdpa_logits = decode(gpu_engine, prompts, atts, graphs=False)
    finally:
        runner._fused_full = True
    assert fused_tokens == sdpa_tokens
    rel = (fused_logits - sdpa_logits).abs().amax() / sdpa_logits.abs().amax()
    assert rel <= 1e-3, float(rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,G,d", [(9, 3, 64), (32, 8, 128), (4, 1, 256)])
def test_fused_full_attention_kernels(dtype, H, G, d):
    """engine/attention_cuda.py over three rows: a buffer read up to its new slot, a full ring whose oldest
    slot the new token replaces (skipped), a padding row: equals attention over the same keys in float64,
    and each new key and value lands in its slot."""
    from engine import attention_cuda

    if not attention_cuda.supported(dtype, d, torch.device("cuda")):
        pytest.skip("the fused kernels need Triton and an sm80+ GPU")
    g = torch.Generator(device="cuda").manual_seed(d)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    caps, spec = [5000, 700, 1], [(4321, 4321), (700, 123), (0, 0)]  # (keys to read, slot written)
    K, V = [rnd(G, c, d) for c in caps], [rnd(G, c, d) for c in caps]
    base = rnd(1)
    table = torch.tensor([[*attention_cuda.offsets(base, [k, v]), c, n, w] for k, v, c, (n, w) in zip(K, V, caps, spec)],
                         device="cuda")
    q, k, v = rnd(3, H, d), rnd(3, G, d), rnd(3, G, d)
    before = [(a.clone(), b.clone()) for a, b in zip(K, V)]
    out = torch.empty_like(q)
    attention_cuda.decode_attention(q, k, v, base, table, attention_cuda.Partials(3, G, H, d, q.device), out,
                                    d ** -0.5)
    for r, ((k0, v0), (n, w)) in enumerate(zip(before, spec)):
        keep = [j for j in range(n) if j != w]
        kk = torch.cat([k0[:, keep], k[r, :, None]], 1).double()
        vv = torch.cat([v0[:, keep], v[r, :, None]], 1).double()
        z = torch.einsum("gpd,gnd->gpn", q[r].double().view(G, H // G, d), kk) * d ** -0.5
        want = torch.einsum("gpn,gnd->gpd", z.softmax(-1), vv).reshape(H, d)
        torch.testing.assert_close(out[r].double(), want, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)
        assert torch.equal(K[r][:, w], k[r]) and torch.equal(V[r][:, w], v[r])


def test_prefill_through_host_memory_equals_prefill_on_device(gpu_engine):
    """On CUDA a long prompt's hidden states stream through pinned host memory on a side stream (forced
    here for a short prompt, with small chunks): the copies are ordered with the layers' work, so the
    logits and the offloaded keys are those of hidden states kept on the device."""
    runner = gpu_engine.runner
    att = AttentionConfig(mode="flat", sink=16, window=max(64, gpu_engine.shape.sliding_window))
    ids = torch.randint(100, gpu_engine.shape.vocab_size - 100, (3000,), generator=torch.Generator().manual_seed(1))
    chunk, limit = runner.chunk, runner.hidden_device_bytes

    def prefill(host: bool):
        kv = SequenceKV(gpu_engine.shape, att, len(ids) + 1, gpu_engine.device, torch.float32)
        runner.chunk, runner.hidden_device_bytes = 256, 0 if host else float("inf")
        try:
            logits, _ = runner.prefill(ids.tolist(), kv)
        finally:
            runner.chunk, runner.hidden_device_bytes = chunk, limit
        store = kv.stores[gpu_engine.shape.global_layers[-1]]  # a sliding-window layer has no store
        keys = store.kv_rows(store.n)[0].clone()
        kv.free()
        return logits.cpu(), keys

    (a, ka), (b, kb) = prefill(False), prefill(True)
    assert torch.equal(a, b) and torch.equal(ka, kb)


def test_prefill_with_copies_on_side_streams_equals_inline(gpu_engine):
    """On CUDA a layer's copies to the CPU stores run on a thread and stream of their own, through pinned
    buffers, after the layer's event, while the next layer fills a second K/V pair; the graphs build in a pool
    from top keys copied to pinned memory without waiting. The logits, stores and graphs equal those of a
    prefill that copies and builds inline (pageable copies, one pair)."""
    from engine.model_runner import InlineExecutor

    runner = gpu_engine.runner
    att = AttentionConfig(mode="retrieval", sink=16, window=max(64, gpu_engine.shape.sliding_window))
    ids = torch.randint(100, gpu_engine.shape.vocab_size - 100, (3000,), generator=torch.Generator().manual_seed(2))
    chunk, pool, to_host = runner.chunk, runner.pool, runner._to_host

    def prefill():
        kv = SequenceKV(gpu_engine.shape, att, len(ids) + 1, gpu_engine.device, torch.float32, gpu_engine.copy_scores)
        runner.chunk = 256
        try:
            logits, _ = runner.prefill(ids.tolist(), kv)
        finally:
            runner.chunk = chunk
        got = [(*(t.clone() for t in s.kv_rows(s.n)), s.adj[:, :s.n].copy()) for s in kv.stores if s.n]
        kv.free()
        return logits.cpu(), got

    assert len(runner._prefill_kv(8, True)) == 2, "one K/V pair: the copies would not overlap the next layer"
    to_host.CHUNK = 2**20  # several pieces per layer, so that both pinned buffers take turns
    try:
        logits, stores = prefill()
    finally:
        del to_host.CHUNK
    runner.pool, runner._to_host = InlineExecutor(), None
    try:
        logits_inline, stores_inline = prefill()
    finally:
        runner.pool, runner._to_host = pool, to_host
    assert torch.equal(logits, logits_inline) and len(stores) == len(stores_inline) > 0
    for (k, v, adj), (ki, vi, adji) in zip(stores, stores_inline):
        assert torch.equal(k, ki) and torch.equal(v, vi) and (adj == adji).all()


@pytest.mark.parametrize("mode", ["retrieval", "streaming"])
def test_a_new_document_entry_copied_on_side_streams_equals_inline(gpu_engine, mode):
    """A prompt that makes a document-cache entry: on CUDA its host K/V (sink and tail, or every token where
    the mode has no stores) and its stores' rows go through the pinned side-stream copies. The entry equals
    the one a prefill that copies inline makes."""
    import numpy as np

    from engine.doc_cache import DocEntry
    from engine.model_runner import InlineExecutor

    if gpu_engine.shape.sliding_layers:
        pytest.skip("the document cache does not serve models with sliding-window layers")
    runner = gpu_engine.runner
    att = AttentionConfig(mode=mode, sink=16, window=max(64, gpu_engine.shape.sliding_window))
    ids = torch.randint(100, gpu_engine.shape.vocab_size - 100, (3000,), generator=torch.Generator().manual_seed(3))
    chunk, pool, to_host = runner.chunk, runner.pool, runner._to_host

    def prefill():
        e = DocEntry((mode,), np.asarray(ids, np.int64))
        kv = SequenceKV(gpu_engine.shape, att, len(ids) + 1, gpu_engine.device, torch.float32, gpu_engine.copy_scores,
                        new_entry=e)
        runner.chunk = 256
        try:
            logits, _ = runner.prefill(ids.tolist(), kv)
        finally:
            runner.chunk = chunk
        kv.free()
        rows = [s.kv_rows(s.n) for s in e.stores if s.n] if e.stores is not None else []
        return logits.cpu(), [t.clone() for t in (e.sink_k, e.sink_v, e.tail_k, e.tail_v, *(t for r in rows for t in r))]

    to_host.CHUNK = 2**20
    try:
        logits, got = prefill()
    finally:
        del to_host.CHUNK
    runner.pool, runner._to_host = InlineExecutor(), None
    try:
        logits_inline, got_inline = prefill()
    finally:
        runner.pool, runner._to_host = pool, to_host
    assert torch.equal(logits, logits_inline) and len(got) == len(got_inline) >= 4
    if mode == "streaming":
        assert got[2].shape[2] == len(ids)  # every token's K/V
    for a, b in zip(got, got_inline):
        assert torch.equal(a, b)


@pytest.mark.parametrize("a,d", [(0, 64), (512, 64), (1000, 64), (512, 128), (1000, 256)])
def test_cudnn_chunk_attention_equals_masked_sdpa(a, d):
    """A prefill chunk's attention as two cuDNN calls merged by log-sum-exp (its own keys causal, the earlier
    ones unmasked) equals SDPA with the lower-right causal mask, GQA heads included, for the head sizes of
    the configured models (64: SmolLM2, 128: Llama 3, 256: Gemma 3)."""
    from torch.nn.attention.bias import causal_lower_right
    import torch.nn.functional as F

    from engine.model_runner import causal_chunk_cudnn

    g = torch.Generator(device="cuda").manual_seed(a)
    c, H, G = 256, 8, 2
    q = torch.randn(c, H, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(a + c, G, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    want = F.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(),
                                          v.transpose(0, 1)[None].float(), attn_mask=causal_lower_right(c, a + c),
                                          scale=0.125, enable_gqa=True)
    got = causal_chunk_cudnn(q, k, v, a, 0.125)  # (the scale need not be d's: both sides take it)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
