"""A passkey hidden in ~3,500 tokens: `retrieval` at its defaults finds it whenever `full` does."""
import pytest

from bench.tasks import passkey
from engine.attention import AttentionConfig
from engine.sampling import SamplingParams
from engine.sequence import Request


def answer(engine, ids, mode):
    outs = engine.generate(Request(ids, SamplingParams(max_tokens=12, temperature=0), AttentionConfig(mode=mode)))
    assert outs[-1].error is None
    return "".join(o.text for o in outs)


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_finds_the_passkey_when_full_does(engine, seed):
    s = passkey(engine.tokenizer, 3500, seed)
    ids = engine.encode_chat(s.messages)
    assert 3300 <= len(ids) <= 3700
    full = s.correct(answer(engine, ids, "full"))
    assert full, "full attention should solve this length (measured 4/4): the test would prove nothing"
    assert s.correct(answer(engine, ids, "retrieval"))
