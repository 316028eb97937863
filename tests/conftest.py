import pytest
import torch

from engine.llm_engine import Engine, EngineConfig

torch.manual_seed(0)


@pytest.fixture(scope="session")
def engine():
    """The embedded model on CPU in float32, shared by the engine tests; without the document cache, so
    that a test's prompt never reuses another's (tests/test_doc_cache.py tests the cache)."""
    eng = Engine(EngineConfig(device="cpu", dtype="float32", doc_cache_gb=0))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def long_prompt(engine):
    """A ~1,600-token chat prompt (a passkey haystack)."""
    from bench.tasks import passkey

    ids = engine.encode_chat(passkey(engine.tokenizer, 1600, seed=7).messages)
    assert len(ids) >= 1500
    return ids
