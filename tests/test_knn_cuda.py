"""The graph input's fused Triton passes (index/knn_cuda.py) find each row's top-L keys (runs where CUDA is)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused graph input needs CUDA")

L = 64


def keys_and_queries(n, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(n, d, device="cuda", generator=g) + 0.3
    q = torch.randn(600, d, device="cuda", generator=g) + 0.3
    k[5000:5300] += 0.8 * q[:1]  # the first rows' best keys crowd into three neighbouring blocks
    k[-7:] += q[300]  # and a few rows' into the last (partial where n is not a multiple of 128) block
    return q.bfloat16(), k.bfloat16()


def assert_top(q, k, ids):
    """ids (rows, L) are the rows' top L up to near-ties: their float32 scores equal the L best scores."""
    s = q.float() @ k.float().T
    got = s.gather(1, ids.long()).sort(1, descending=True).values
    want = s.topk(L, dim=1).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert all(len(set(r)) == L for r in ids.tolist())


@pytest.mark.parametrize("n,d", [(20000, 128), (20077, 64), (40960, 256)])
def test_fused_top_keys_equal_the_float32_top_keys(n, d):
    from index import knn_cuda

    q, k = keys_and_queries(n, d, n)
    assert knn_cuda.supported(q, k, L)
    ids, redo = knn_cuda.topk_ids(q, k, L)
    assert int(redo.sum()) == 0, f"{int(redo.sum())} rows over the candidate list"
    assert_top(q[~redo], k, ids[~redo])


def test_rows_with_too_many_candidates_are_redone_by_the_torch_path(monkeypatch):
    """A candidate list shorter than the rows' candidates: the fused pass marks those rows, and index.knn
    redoes them, so that its result stays exact."""
    from index import knn_cuda
    from index.knn import graph_knn

    q, k = keys_and_queries(20000, 128, 1)
    monkeypatch.setattr(knn_cuda, "CAP", 80)
    _, redo = knn_cuda.topk_ids(q, k, L)
    assert 0 < int(redo.sum()) < len(q)
    # two KV heads (the second's keys in reverse order), one query head each: rows redone in both
    ids = torch.as_tensor(graph_knn(q[:, None].expand(-1, 2, -1), torch.stack([k, k.flip(0)]), L, "kv")).cuda()
    assert_top(q, k, ids[0])
    assert_top(q, k.flip(0), ids[1])
