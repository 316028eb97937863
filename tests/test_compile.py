"""The fused kernels (torch.compile, on CUDA) are compiled when the engine starts, for every shape a request
uses. Checked on CPU with dynamo's eager backend, which guards as inductor does: after ModelRunner.compile
a prefill and decode steps of every kind (pool rows, `full` alone, a mix) compile nothing more."""
import torch

from engine.attention import AttentionConfig
from engine.kv import SequenceKV, StaticPools
from engine.loader import load_model
from engine.model_runner import ModelRunner


def test_requests_compile_nothing_after_the_warm_up(monkeypatch):
    from torch._dynamo import reset
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))
    reset()
    try:
        model, _ = load_model("smollm2-135m-instruct", "cpu", torch.float32, "auto", 0)
        runner = ModelRunner(model, chunk=512)
        assert runner.compile()
        compiled = counters["stats"]["unique_graphs"]
        assert compiled > 0
        pools = StaticPools(model.shape, torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (600, 150, 300, 200)]
        modes = ["streaming", "retrieval", "full", "full"]
        kvs = [SequenceKV(model.shape, AttentionConfig(mode=m, sink=16, window=64), len(p) + 8, torch.device("cpu"),
                          torch.float32, pools=pools) for p, m in zip(prompts, modes)]
        tokens = [int(runner.prefill(p, kv)[0].argmax()) for p, kv in zip(prompts, kvs)]
        for batch in ([0], [0, 1], [2], [2, 3], [0, 1, 2, 3]):  # rows of one pool, `full` alone, a mix
            out = runner.decode_batch([tokens[b] for b in batch], [len(prompts[b]) for b in batch],
                                      [kvs[b] for b in batch], [100] * len(batch))
            assert torch.isfinite(out).all()
            for b in batch:
                prompts[b] = prompts[b] + [tokens[b]]
        assert counters["stats"]["unique_graphs"] == compiled, "a request compiled a new shape"
        for kv in kvs:
            kv.free()
    finally:
        reset()
