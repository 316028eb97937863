import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one torch thread each
    # (numba's kernels keep their threads: with one, their parallel loops would run untested)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.llm_engine import Engine, EngineConfig  # noqa: E402

torch.manual_seed(0)

# The modules with the most work first (the Makefile turns xdist's own reordering, by test count, off), so
# that the two workers of `make test` do not end with one of them alone on a long one; the rest keep their order.
HEAVY = ["test_engine_modes", "test_doc_cache", "test_gemma", "test_batching", "test_fuzz", "test_server",
         "test_reliability", "test_operations", "test_passkey", "test_accuracy_small", "test_admission",
         "test_lifecycle", "test_reference", "test_load_bench", "test_compile", "test_sampling", "test_packaging"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY)}
    items.sort(key=lambda it: rank.get(it.nodeid.split("::")[0].rpartition("/")[2].removesuffix(".py"), len(HEAVY)))


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        # the workers would otherwise compile numba's kernels at the same time into one on-disk cache (its
        # index files are not written under a lock): compile them once here, before they start
        from index import warm_up

        warm_up()


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
