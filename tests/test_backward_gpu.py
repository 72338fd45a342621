"""Main-branch backward kernels (delta pre-pass, KV-outer dQ/dK/dV) against the float64 reference (`pytest -m gpu`)."""

import pytest
import torch

from msa_tl import reference as R
from msa_tl.checks import relative_error
from test_main_branch_gpu import attention_inputs, selection

pytestmark = pytest.mark.gpu
GRAD_RTOL = 2e-2  # bf16 gradients, relative Frobenius error (issue 5)


def check_backward(B, N, Hq, G, D, Bk, topk, kind, with_dlse=False, **kw):
    from msa_tl.attention.kv_outer import sparse_attention_forward
    from msa_tl.attention.backward import sparse_attention_backward

    q, k, v = attention_inputs(B, N, Hq, G, D)
    indices = selection(kind, B, N, G, Bk, topk)
    o, lse = sparse_attention_forward(q, k, v, indices, Bk)
    do = torch.randn_like(q)
    dlse = torch.randn_like(lse) if with_dlse else None
    grads = sparse_attention_backward(do, dlse, q, k, v, indices, o, lse, Bk, **kw)
    expected = R.sparse_attention_backward(do, dlse, q, k, v, indices, Bk)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, expected):
        assert got.dtype == q.dtype and got.shape == ref.shape
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        rel = relative_error(got, ref)
        assert rel <= GRAD_RTOL, f"{name} rel err {rel:.2e}"


@pytest.mark.parametrize("dq", ["atomic", "partials"])
@pytest.mark.parametrize("kind", ["random", "realistic", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Bk,topk", [(1, 2125, 64, 4, 128, 128, 16), (2, 1000, 16, 2, 64, 64, 8)],
                         ids=["paper-ragged", "b2-Bk64"])
def test_backward_matches_reference(kind, B, N, Hq, G, D, Bk, topk, dq):
    check_backward(B, N, Hq, G, D, Bk, topk, kind, config=dict(dq_partials=dq == "partials"))


@pytest.mark.parametrize("dq", ["atomic", "partials"])
@pytest.mark.parametrize("kind", ["random", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,Bk,topk", [(1, 1500, 32, 2, 128, 8), (2, 700, 16, 2, 64, 6)],
                         ids=["Bk128-as-halves", "b2-Bk64"])
def test_wide_heads_backward_matches_reference(kind, B, N, Hq, G, Bk, topk, dq):
    """Head dim 256: each 128-key block as its two 64-key halves, dQ / dK / dV in two launches of 128 columns each
    (both computing S and dP over all 256)."""
    check_backward(B, N, Hq, G, 256, Bk, topk, kind, config=dict(dq_partials=dq == "partials"))


@pytest.mark.parametrize("Hq,G,D", [(64, 4, 128), (8, 8, 128), (16, 2, 64), (16, 2, 256)],
                         ids=["R16", "R1", "R8-D64", "R8-D256"])
def test_backward_dq_partials_over_query_chunks(Hq, G, D):
    """dQ partials of several query chunks (the last one ragged), each with its own schedule and sum."""
    check_backward(1, 1700, Hq, G, D, 128, 8, "random", query_chunk=384, config=dict(dq_partials=True))


@pytest.mark.parametrize("Hq,G", [(8, 8), (16, 4), (32, 4), (64, 4)], ids=["R1", "R4", "R8", "R16"])
def test_backward_gqa_ratios_and_split_hot_blocks(Hq, G):
    """Small work items split the hot block across many CTAs, whose dK / dV adds must all land."""
    check_backward(1, 1500, Hq, G, 128, 128, 4, "hot", item_queries=48)
    check_backward(1, 1500, Hq, G, 128, 128, 4, "hot", item_queries=48, config=dict(dq_partials=True))


def test_backward_carries_the_lse_gradient():
    check_backward(1, 900, 32, 2, 128, 128, 4, "random", with_dlse=True)


def test_full_budget_backward_equals_dense_sdpa_backward():
    B, N, Hq, G, D, Bk = 1, 1024, 16, 4, 128, 128
    q, k, v = (t.requires_grad_(True) for t in attention_inputs(B, N, Hq, G, D))
    indices = selection("random", B, N, G, Bk, N // Bk)
    import msa_tl

    do = torch.randn_like(q)
    msa_tl.sparse_attention(q, k, v, indices, block_size=Bk).backward(do)
    ours = [t.grad.double() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    dense.backward(do)
    for got, t in zip(ours, (q, k, v)):
        ref = t.grad.double()
        assert relative_error(got, ref) <= GRAD_RTOL


@pytest.mark.parametrize("Hq,G,D", [(28, 4, 128), (24, 2, 128), (12, 4, 128), (16, 4, 96), (16, 2, 192)],
                         ids=["R7-qwen", "R12", "R3", "D96", "D192"])
def test_gqa_ratios_that_do_not_tile_64_rows_run_padded_through_the_api(Hq, G, D):
    """Forward and backward through the autograd op, on the kernels with zero query heads (and head dims) padded in."""
    import msa_tl
    from msa_tl.ops import dispatch

    B, N, Bk, topk = 1, 1100, 128, 4
    assert dispatch.kernel_for("sparse_attention_backward", torch.device("cuda"), dtype=torch.bfloat16, heads=Hq,
                               groups=G, head_dim=D, block_size=Bk, topk=topk) is not None
    q, k, v = (t.requires_grad_(True) for t in attention_inputs(B, N, Hq, G, D))
    indices = selection("random", B, N, G, Bk, topk)
    o, lse = msa_tl.sparse_attention(q, k, v, indices, block_size=Bk, return_lse=True)
    ref_o, ref_lse = R.sparse_attention(q.detach(), k.detach(), v.detach(), indices, Bk)
    assert relative_error(o, ref_o) <= 1e-2 and (lse.double() - ref_lse).abs().max().item() <= 1e-3
    do = torch.randn_like(o)
    o.backward(do)
    expected = R.sparse_attention_backward(do, None, q.detach(), k.detach(), v.detach(), indices, Bk)
    for name, got, ref in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), expected):
        assert torch.isfinite(got).all() and relative_error(got, ref) <= GRAD_RTOL, name


def test_a_nan_key_reaches_the_gradients_that_depend_on_it():
    """As in dense attention over the chosen tokens: a NaN score makes dq NaN for exactly the rows that see it;
    dk / dv turn NaN at least where the reference's do and only inside blocks those rows chose (the kernels
    work in whole blocks); every other gradient is finite and matches the reference."""
    import math

    import msa_tl

    B, N, Hq, G, D, Bk, topk = 1, 1500, 32, 2, 128, 128, 3
    q, k, v = attention_inputs(B, N, Hq, G, D)
    k[0, 1450, 1, 5] = float("nan")  # seen by queries 1450.. of the last block, which choose blocks 0, 10, 11
    indices = selection("hot", B, N, G, Bk, topk)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    do = torch.randn_like(q)
    msa_tl.sparse_attention(*leaves, indices, block_size=Bk).backward(do)
    expected = R.sparse_attention_backward(do, None, q, k, v, indices, Bk)
    dq, dk, dv = (t.grad for t in leaves)
    assert torch.equal(torch.isnan(dq), torch.isnan(expected[0])) and torch.isnan(dq).any()
    poisoned = torch.isnan(R.sparse_attention(q, k, v, indices, Bk)[1]).view(B, N, G, Hq // G).any(-1)  # [B, N, G]
    chosen = torch.zeros(B, G, math.ceil(N / Bk) + 1, dtype=torch.bool, device="cuda")
    blocks = torch.where(poisoned[..., None] & (indices >= 0), indices, chosen.shape[-1] - 1).long()  # [B, N, G, k]
    chosen.scatter_(-1, blocks.permute(0, 2, 1, 3).reshape(B, G, -1), True)
    reachable = chosen[..., :-1].repeat_interleave(Bk, dim=-1)[..., :N].permute(0, 2, 1)[..., None]  # [B, N, G, 1]
    for name, got, ref in (("dq", dq, expected[0]), ("dk", dk, expected[1]), ("dv", dv, expected[2])):
        assert (torch.isnan(got) | ~torch.isnan(ref)).all(), f"{name}: a NaN of the reference is missing"
        if name != "dq":
            assert not (torch.isnan(got) & ~reachable).any(), f"{name}: NaN outside the blocks the NaN rows chose"
        clean = ~(torch.isnan(ref) | (reachable.expand_as(ref) if name != "dq" else torch.isnan(got)))
        assert relative_error(got[clean], ref[clean]) <= GRAD_RTOL, name
