import pytest

from engine.attention import AttentionConfig
from engine.detokenize import IncrementalDetokenizer
from engine.sampling import SamplingParams
from engine.sequence import Request

FAST = AttentionConfig(mode="full")


def text_of(engine, ids, **kw):
    outs = engine.generate(Request(ids, SamplingParams(**kw), FAST))
    assert outs[-1].error is None
    return "".join(o.text for o in outs), outs


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.encode_chat([{"role": "user", "content": "Tell me a story about a dragon."}])


def test_same_seed_same_output_and_seeds_differ(engine, prompt):
    a, _ = text_of(engine, prompt, max_tokens=20, temperature=1.0, seed=123)
    b, _ = text_of(engine, prompt, max_tokens=20, temperature=1.0, seed=123)
    c, _ = text_of(engine, prompt, max_tokens=20, temperature=1.0, seed=321)
    assert a == b and a != c


def test_top_k_one_is_greedy(engine, prompt):
    g, _ = text_of(engine, prompt, max_tokens=12, temperature=0)
    k1, _ = text_of(engine, prompt, max_tokens=12, temperature=0.8, top_k=1, seed=5)
    tiny_p, _ = text_of(engine, prompt, max_tokens=12, temperature=0.8, top_p=1e-6, seed=5)
    assert g == k1 == tiny_p


def test_max_tokens_gives_length(engine, prompt):
    _, outs = text_of(engine, prompt, max_tokens=5, temperature=0)
    assert outs[-1].finish_reason == "length" and outs[-1].num_generated == 5


def test_stop_string_ends_output_and_never_leaks(engine, prompt):
    full, _ = text_of(engine, prompt, max_tokens=30, temperature=0, ignore_eos=True)
    word = full.split()[3]
    stop = word[1:4] if len(word) > 4 else word
    cut = full.index(stop)
    out, outs = text_of(engine, prompt, max_tokens=30, temperature=0, stop=[stop])
    assert out == full[:cut] and outs[-1].finish_reason == "stop"


def test_stop_token_ids(engine, prompt):
    _, outs = text_of(engine, prompt, max_tokens=30, temperature=0)
    third = [o.token for o in outs][2]
    _, outs2 = text_of(engine, prompt, max_tokens=30, temperature=0, stop_token_ids=[third])
    assert outs2[-1].finish_reason == "stop" and outs2[-1].token == third and len(outs2) == 3


def test_penalties_change_the_output(engine, prompt):
    base, _ = text_of(engine, prompt, max_tokens=40, temperature=0, ignore_eos=True)
    pen, _ = text_of(engine, prompt, max_tokens=40, temperature=0, ignore_eos=True, frequency_penalty=2.0,
                     presence_penalty=2.0)
    assert base != pen


def test_logprobs(engine, prompt):
    _, outs = text_of(engine, prompt, max_tokens=4, temperature=0, logprobs=3)
    for o in outs:
        assert len(o.sample.top) == 3 and o.sample.top[0][0] == o.token  # greedy: the chosen is the most likely
        assert o.sample.logprob <= 0


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop=[""]),
                                 dict(presence_penalty=3), dict(logprobs=50)])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_incremental_detokenizer_never_emits_broken_utf8(engine):
    text = "Héllo wörld — 你好，世界 🐉🔥 ok"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(engine.tokenizer)
    parts = [d.add(t)[0] for t in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) == engine.tokenizer.decode(ids)


def test_detokenizer_holds_back_a_partial_stop_string(engine):
    ids = engine.tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    d = IncrementalDetokenizer(engine.tokenizer, stop=[" gamma"])
    out, stopped = "", False
    for t in ids:
        piece, stopped = d.add(t)
        out += piece
        assert "gam" not in out
        if stopped:
            break
    assert stopped and out == "alpha beta"


def test_extreme_but_valid_top_p_and_temperature_still_sample():
    import torch

    from engine.sampling import Sampler

    logits = torch.randn(1000) * 3
    for kw in (dict(top_p=5e-324), dict(temperature=1e-300), dict(temperature=1e-300, top_p=1e-9)):
        token = Sampler(SamplingParams(**kw, seed=0), 1000, torch.device("cpu"))(logits).token
        assert token == int(torch.argmax(logits)), kw  # both collapse to the top token
