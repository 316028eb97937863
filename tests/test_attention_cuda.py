"""engine.attention_cuda (CUDA only): the split-K decode attention equals SDPA's."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton decode attention needs CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("n", [1, 63, 64, 1000, 70001])
def test_full_attention_equals_sdpa(dtype, d, n):
    from engine.attention_cuda import full_attention, supported

    torch.manual_seed(n)
    G, per, cap = 4, 4, n + 37  # a buffer longer than its keys: the rest is never read
    q = torch.randn(G * per, d, device="cuda", dtype=dtype)
    k = torch.randn(G, cap, d, device="cuda", dtype=dtype)
    v = torch.randn(G, cap, d, device="cuda", dtype=dtype)
    k[:, n:], v[:, n:] = float("nan"), float("nan")
    assert supported(q, k)
    ref = F.scaled_dot_product_attention(q.float().view(1, G, per, d), k[None, :, :n].float(), v[None, :, :n].float(),
                                         scale=d ** -0.5).reshape(-1, d)
    for splits in (1, 7, 128):
        o = full_attention(q, k, v, n, d ** -0.5, splits=splits)
        assert o.dtype == dtype and o.shape == q.shape
        torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)
