import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one torch thread each
    # (numba's kernels keep their threads: with one, their parallel loops would run untested)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.llm_engine import Engine, EngineConfig  # noqa: E402

torch.manual_seed(0)

# The modules with the most work first (the Makefile turns xdist's own reordering, by test count, off), so
# that the two workers of `make test` do not end with one of them alone on a long one; the rest keep their order
# (a new module with more than a few seconds of work belongs in this list).
HEAVY = ["test_engine_modes", "test_doc_cache", "test_gemma", "test_batching", "test_fuzz", "test_server",
         "test_reliability", "test_operations", "test_passkey", "test_accuracy_small", "test_admission",
         "test_lifecycle", "test_reference", "test_load_bench", "test_compile", "test_sampling", "test_packaging"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY)}
    items.sort(key=lambda it: rank.get(it.nodeid.split("::")[0].rpartition("/")[2].removesuffix(".py"), len(HEAVY)))


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        # Before the workers start, once: numba's kernels, in two processes that take half of them each (~110 s
        # on 2 cores against ~150 s in one), and the embedded model's dequantised copy (~20 s; loader.py caches
        # it per installed file). Both workers would otherwise do all of it at once, in their first tests.
        import subprocess
        import sys

        from index import warm_up

        others = []
        try:
            for code in ("from index import warm_up; warm_up(1, 2)",
                         "import torch; from engine.loader import EMBEDDED, load_model; "
                         "load_model(EMBEDDED, 'cpu', torch.float32)"):
                others.append(subprocess.Popen([sys.executable, "-c", code]))
            warm_up(0, 2)
            for p in others:
                if p.wait(timeout=900):
                    raise RuntimeError(f"a warm-up process failed ({p.args[-1]}: {p.returncode})")
        finally:
            for p in others:
                if p.poll() is None:  # this part failed, or another hangs: none may outlive the run
                    p.kill()
                    p.wait()


@pytest.fixture(scope="session")
def engine():
    """The embedded model on CPU in float32, shared by the engine tests; without the document cache, so
    that a test's prompt never reuses another's (tests/test_doc_cache.py tests the cache)."""
    eng = Engine(EngineConfig(device="cpu", dtype="float32", doc_cache_gb=0))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def long_prompt(engine):
    """A ~1,250-token chat prompt (a passkey haystack): past the default sink + window by ~600 tokens, and
    long enough for the cached-document tests' 1,150-token documents."""
    from bench.tasks import passkey

    ids = engine.encode_chat(passkey(engine.tokenizer, 1250, seed=7).messages)
    assert len(ids) >= 1200
    return ids
