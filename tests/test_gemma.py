"""Gemma 3 270M, the second embedded model: five sliding-window layers (512 keys) for every global one.
Its `full` mode is transformers' model; the partial modes keep only the global layers' keys on the CPU."""
import pytest
import torch

from engine import kv as kv_module
from engine.attention import AttentionConfig
from engine.kv import SequenceKV
from engine.sampling import SamplingParams
from engine.sequence import Request


@pytest.fixture(scope="module")
def gemma():
    from engine.llm_engine import Engine, EngineConfig

    eng = Engine(EngineConfig(model="gemma-3-270m", device="cpu", dtype="float32", doc_cache_gb=0))
    yield eng
    eng.shutdown()


def prompt(gemma, n: int, seed: int = 0) -> list[int]:
    """Random ordinary tokens: a prompt whose next tokens depend on what each layer really sees."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, gemma.shape.vocab_size // 2, (n,), generator=g).tolist()


def greedy(gemma, ids, atts: list[AttentionConfig], steps: int):
    """One prefill forked into each configuration, each then decoded greedily -> [(logits (steps + 1, V),
    stored keys per layer)] in the order of atts."""
    kvs = [SequenceKV(gemma.shape, att, len(ids) + steps + 1, gemma.device, torch.float32, gemma.copy_scores,
                      gemma.pools) for att in atts]
    try:
        logits, _ = gemma.runner.prefill_many(ids, kvs)
        runs = []
        for att, kv in zip(atts, kvs):
            out = [logits]
            for i in range(steps):
                out.append(gemma.runner.decode(int(out[-1].argmax()), len(ids) + i, kv, att.top_k))
            runs.append((torch.stack(out), [st.n for st in kv.stores or []]))
        return runs
    finally:
        for kv in kvs:
            kv.free()


def test_full_mode_is_transformers_gemma3(gemma, monkeypatch):
    """fp32, a prompt past the sliding window: the same logits (1e-4 relative) and greedy tokens."""
    from transformers import AutoModelForCausalLM

    from engine.loader import _gguf_cache_dir, gemma_270m_path

    assert gemma.shape.sliding_window == 512 and gemma.shape.global_layers == [5, 11, 17]
    hf = AutoModelForCausalLM.from_pretrained(str(_gguf_cache_dir(gemma_270m_path())), dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    # past the window at the prefill; and within it at the prefill, past it while decoding, the global
    # layers' buffers starting small and growing (at the prefill and while decoding) beside the rings
    for n, steps, chunk in ((700, 5, kv_module.FULL_CHUNK), (500, 24, 8)):
        monkeypatch.setattr(kv_module, "FULL_CHUNK", chunk)
        ids = prompt(gemma, n)
        ((ours, _),) = greedy(gemma, ids, [AttentionConfig(mode="full")], steps)
        tokens = ours.argmax(-1).tolist()
        with torch.no_grad():
            ref = hf(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:].float()
        assert ref.argmax(-1).tolist() == tokens
        assert float((ours - ref).norm() / ref.norm()) < 1e-4


def test_full_mode_keeps_a_ring_of_the_window_in_a_sliding_window_layer(gemma):
    """As transformers' hybrid cache: the test above runs through its wrap-around (700 tokens, 512 slots)."""
    kv = SequenceKV(gemma.shape, AttentionConfig(mode="full"), 20_000, gemma.device, torch.float32)
    try:
        assert [k.shape[1] for k in kv.k] == [512 if l in gemma.shape.sliding_layers else kv_module.FULL_CHUNK
                                              for l in range(gemma.shape.n_layers)]
    finally:
        kv.free()


def test_flat_with_every_key_equals_full_and_only_global_layers_offload(gemma):
    """A 1.2K-token prompt and a window eviction while decoding: `flat` over every offloaded key gives `full`'s
    logits; the sliding-window layers attend from the device ring alone and their stores stay empty."""
    N = 1200
    ids = prompt(gemma, N, seed=1)
    (full, _), (flat, n) = greedy(gemma, ids, [AttentionConfig(mode="full"),
                                               AttentionConfig(mode="flat", top_k=10**9, sink=16, evict_block=8)], 12)
    assert flat.argmax(-1).tolist() == full.argmax(-1).tolist()
    assert float((flat - full).norm() / full.norm()) < 1e-4
    assert all(n[l] == 0 for l in gemma.shape.sliding_layers)
    assert all(n[l] == N - 16 - 512 + 8 for l in gemma.shape.global_layers)  # one block evicted


def test_a_sliding_window_layer_never_reads_outside_its_window(gemma):
    """The first prompt token sits in the sink on the device. Past the window, changing its K/V changes
    nothing through a sliding-window layer and changes the output through a global one."""
    ids = prompt(gemma, 700, seed=2)
    att = AttentionConfig(mode="streaming")

    layers = [None, gemma.shape.sliding_layers[0], gemma.shape.global_layers[0]]
    kvs = [SequenceKV(gemma.shape, att, len(ids) + 2, gemma.device, torch.float32, pools=gemma.pools) for _ in layers]
    try:
        logits, _ = gemma.runner.prefill_many(ids, kvs)  # one prefill, three copies of its K/V
        for layer, kv in zip(layers, kvs):
            if layer is not None:
                kv.k[layer, :, 0] += 5.0
                kv.v[layer, :, 0] += 5.0
        base, sliding, global_ = (gemma.runner.decode(int(logits.argmax()), len(ids), kv, att.top_k) for kv in kvs)
    finally:
        for kv in kvs:
            kv.free()
    assert torch.equal(sliding, base)
    assert not torch.allclose(global_, base, atol=1e-3)


def test_a_window_smaller_than_the_sliding_window_is_refused_unless_the_request_fits_it(gemma):
    with pytest.raises(ValueError, match="at least 512"):
        gemma.submit(Request(prompt(gemma, 10), SamplingParams(max_tokens=600), AttentionConfig(window=256)),
                     lambda o: None)
    # prompt and new tokens within the window: no token ever leaves it, the request is served, as with the
    # model's window
    def tokens(window):
        r = Request(prompt(gemma, 10), SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0),
                    AttentionConfig(window=window))
        return [o.token for o in gemma.generate(r)]

    assert len(tokens(256)) == 4 and tokens(256) == tokens(512)


def test_the_gemma3_shapes_for_dummy_weights():
    """configs/models: the 270M's layout as its GGUF has it, and the 4B's (a 1,024-token window, linear RoPE
    scaling for the global layers) for speed runs on the GPU machine."""
    from engine.loader import shape_config
    from engine.model import ModelShape

    small, big = (ModelShape.from_hf(shape_config(n)) for n in ("gemma-3-270m", "gemma-3-4b"))
    assert (small.n_layers, small.global_layers, small.sliding_window) == (18, [5, 11, 17], 512)
    assert (big.n_layers, big.global_layers, big.sliding_window, big.n_kv_heads) == (34, [5, 11, 17, 23, 29], 1024, 4)


def test_the_base_model_completes_text_and_refuses_chat(gemma):
    ids = gemma.encode("The capital of France is")
    assert ids[0] == gemma.tokenizer.bos_token_id
    outs = gemma.generate(Request(ids, SamplingParams(max_tokens=4, temperature=0)))
    assert outs[-1].error is None and outs[-1].finish_reason == "length" and len(outs) == 4
    with pytest.raises(ValueError, match="no chat template"):
        gemma.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("seed", range(1))  # 4/4 solved by both on seeds 0-3; one keeps the suite short
def test_retrieval_finds_the_passkey_when_full_does(gemma, seed):
    """~3.5K tokens, completion-style (a base model): one prefill for both, each decoded greedily."""
    from bench.accuracy import Run, run_sample
    from bench.tasks import passkey

    s = passkey(gemma.tokenizer, 3500, seed)
    ids = s.prompt_ids(gemma)
    assert 3300 <= len(ids) <= 3700
    out = run_sample(gemma, ids, [Run("full", AttentionConfig(mode="full")), Run("retrieval", AttentionConfig())],
                     12, done=s.correct)
    assert s.correct(out["full"]["text"]), "full should solve this length (measured 4/4): else the test proves nothing"
    assert s.correct(out["retrieval"]["text"]), (out["full"]["text"], out["retrieval"]["text"])

def test_full_mode_scales_scores_by_query_pre_attn_scalar(tmp_path):
    """A Gemma 3 whose query_pre_attn_scalar is not head_dim (as in the 27B): random weights saved as a
    checkpoint; `full` gives transformers' logits (the embedded 270M has both at 256: no check of it)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from engine.loader import load_model
    from engine.model_runner import ModelRunner

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=8,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), "cpu", torch.float32)
    kv = SequenceKV(model.shape, AttentionConfig(mode="full"), 41, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, _ = ModelRunner(model, 1).prefill(ids, kv)
    kv.free()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].float()
    assert float((ours - ref).norm() / ref.norm()) < 1e-4
