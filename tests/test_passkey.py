"""A passkey hidden in ~3,500 tokens: `retrieval` at its defaults finds it whenever `full` does."""
import pytest

from bench.accuracy import Run, run_sample
from bench.tasks import passkey
from engine.attention import AttentionConfig


@pytest.mark.parametrize("seed", range(1))  # 4/4 solved by both on seeds 0-3; one keeps the suite short
def test_retrieval_finds_the_passkey_when_full_does(engine, seed):
    s = passkey(engine.tokenizer, 3500, seed)
    ids = engine.encode_chat(s.messages)
    assert 3300 <= len(ids) <= 3700
    # one prefill for both (the benchmarks' fork), each decoded greedily until its answer is complete
    out = run_sample(engine, ids, [Run("full", AttentionConfig(mode="full")), Run("retrieval", AttentionConfig())],
                     12, done=s.correct)
    assert s.correct(out["full"]["text"]), "full should solve this length (measured 4/4): else the test proves nothing"
    assert s.correct(out["retrieval"]["text"])
