import torch

from engine.attention import merge_partial_attention, partial_attention


def _softmax_attention(q, k, v, scale):
    G, T, d = k.shape
    qg = q.view(G, -1, d)
    p = torch.softmax(qg @ k.transpose(1, 2) * scale, -1)
    return (p @ v).reshape(-1, d)


def test_merge_equals_softmax_over_union():
    g = torch.Generator().manual_seed(0)
    H, G, d = 8, 2, 16
    q = torch.randn(H, d, generator=g)
    k = torch.randn(G, 50, d, generator=g) * 2
    v = torch.randn(G, 50, d, generator=g)
    scale = d ** -0.5
    bias = torch.zeros(50)
    part1 = partial_attention(q, k[:, :17], v[:, :17], bias[:17], scale)
    part2 = partial_attention(q, k[:, 17:], v[:, 17:], bias[17:], scale)
    merged = merge_partial_attention(*part1, *part2)
    torch.testing.assert_close(merged, _softmax_attention(q, k, v, scale), rtol=1e-5, atol=1e-6)


def test_merge_with_an_empty_part_is_the_other_part():
    g = torch.Generator().manual_seed(1)
    H, G, d = 4, 4, 8
    q = torch.randn(H, d, generator=g)
    k, v = torch.randn(G, 10, d, generator=g), torch.randn(G, 10, d, generator=g)
    o, m, s = partial_attention(q, k, v, torch.zeros(10), 0.3)
    empty = (torch.zeros(H, d), torch.full((H,), float("-inf")), torch.zeros(H))
    torch.testing.assert_close(merge_partial_attention(o, m, s, *empty), o)
    torch.testing.assert_close(merge_partial_attention(*empty, o, m, s), o)


def test_masked_slots_do_not_count():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 8, generator=g), torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    bias = torch.tensor([0.0, float("-inf"), 0.0, 0.0, float("-inf"), 0.0])
    o, _, _ = partial_attention(q, k, v, bias, 0.5)
    keep = bias == 0
    torch.testing.assert_close(o, _softmax_attention(q, k[:, keep], v[:, keep], 0.5))


def test_a_part_with_no_keys_is_zero_never_nan():
    """A decode step's padding rows have no keys: their K/V must not turn NaN (others may read them)."""
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8)
    bias = torch.zeros(2, 5)
    bias[1] = float("-inf")  # row 1: no keys
    o, m, s = partial_attention(q, k, k, bias, 0.3)
    assert torch.isfinite(o).all() and (o[1] == 0).all() and (m[1] == float("-inf")).all() and (s[1] == 0).all()
    merged = merge_partial_attention(o, m, s, torch.zeros_like(o), torch.full_like(m, float("-inf")),
                                     torch.zeros_like(s))
    assert torch.isfinite(merged).all() and (merged[1] == 0).all()
    torch.testing.assert_close(merged[0], o[0])
