"""KL alignment loss kernels (stats + merge, backward) against the float64 reference (`pytest -m gpu`)."""

import math

import pytest
import torch

from msa_tl import reference as R
from msa_tl.checks import relative_error
from test_main_branch_gpu import attention_inputs, selection

pytestmark = pytest.mark.gpu


def check_close(name, got, want, tol=2e-2):
    assert got.shape == want.shape and torch.isfinite(got).all(), name
    rel = relative_error(got, want)
    assert rel <= tol, f"{name} rel err {rel:.2e}"


@pytest.mark.parametrize("kind", ["random", "realistic", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Di,Bk,topk", [(1, 2125, 64, 4, 128, 128, 128, 16), (2, 1000, 8, 2, 64, 64, 64, 8),
                                                   (1, 1300, 32, 2, 256, 128, 128, 8)],
                         ids=["paper-ragged", "b2-Bk64", "D256"])
def test_kl_loss_and_gradients_match_reference(kind, B, N, Hq, G, D, Di, Bk, topk):
    from msa_tl.kl_loss import kl_alignment_loss_backward, kl_alignment_loss_forward
    from msa_tl.attention.kv_outer import sparse_attention_forward

    q, k, v = attention_inputs(B, N, Hq, G, D)
    q_idx = torch.randn(B, N, G, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(B, N, Di, device="cuda", dtype=torch.bfloat16)
    indices = selection(kind, B, N, G, Bk, topk)
    scale, index_scale = 1 / math.sqrt(D), 1 / math.sqrt(Di)
    ref, ref_lse_student = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, scale, index_scale,
                                               return_student_lse=True)
    ref_dq, ref_dk = R.kl_alignment_loss_backward(1.7, q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    # the main branch's lse, as the layer passes it, and recomputed inside (lse=None)
    _, main_lse = sparse_attention_forward(q, k, v, indices, Bk, scale)
    dloss = torch.tensor(1.7, device="cuda")
    for lse in (main_lse, None):
        loss, lse_student = kl_alignment_loss_forward(q, k, q_idx, k_idx, indices, Bk, scale, index_scale, lse)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-5, (loss.item(), ref.item())
        assert (lse_student.double() - ref_lse_student).abs().max().item() <= 1e-3
        # the forward's own gradients (dloss = 1), from the same pass as the value
        loss_g, _, dq_unit, dk_unit = kl_alignment_loss_forward(q, k, q_idx, k_idx, indices, Bk, scale, index_scale,
                                                                lse, with_grads=True)
        assert abs(loss_g.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-5, (loss_g.item(), ref.item())
        check_close("dq_idx (forward)", dq_unit, ref_dq / 1.7)
        check_close("dk_idx (forward)", dk_unit, ref_dk / 1.7)
        for student in (lse_student, None):
            dq_idx, dk_idx = kl_alignment_loss_backward(dloss, q, k, q_idx, k_idx, indices, Bk, scale, index_scale,
                                                        lse, student)
            assert dq_idx.dtype == torch.bfloat16 and dk_idx.dtype == torch.bfloat16
            check_close("dq_idx", dq_idx, ref_dq)
            check_close("dk_idx", dk_idx, ref_dk)


@pytest.mark.parametrize("kind", ["random", "realistic", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Di,Bk,topk", [(1, 2125, 64, 4, 128, 128, 128, 16), (2, 1000, 16, 2, 64, 64, 64, 8)],
                         ids=["paper-ragged", "b2-Bk64-R8"])
def test_128_row_kl_tiles_match_the_reference(kind, B, N, Hq, G, D, Di, Bk, topk):
    """The fused pass with tiles of 128 query rows (config tile_rows=128: half the tiles, each 8 or 16 queries): the
    loss and both index gradients against the float64 reference, as the 64-row default is held."""
    from msa_tl.kl_loss import kl_alignment_loss_forward

    q, k, _ = attention_inputs(B, N, Hq, G, D)
    q_idx = torch.randn(B, N, G, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(B, N, Di, device="cuda", dtype=torch.bfloat16)
    indices = selection(kind, B, N, G, Bk, topk)
    scale, index_scale = 1 / math.sqrt(D), 1 / math.sqrt(Di)
    ref = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    ref_dq, ref_dk = R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    loss, _, dq_idx, dk_idx = kl_alignment_loss_forward(q, k, q_idx, k_idx, indices, Bk, scale, index_scale,
                                                        with_grads=True, config=dict(tile_rows=128))
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-5, (loss.item(), ref.item())
    check_close("dq_idx", dq_idx, ref_dq)
    check_close("dk_idx", dk_idx, ref_dk)


@pytest.mark.parametrize("B,N,Hq,G,D,Di,Bk", [(1, 1500, 16, 4, 128, 128, 128), (2, 1000, 8, 2, 64, 64, 64)],
                         ids=["Bk128-ragged", "b2-Bk64"])
def test_warmup_kl_over_every_visible_token_matches_reference(B, N, Hq, G, D, Di, Bk):
    from msa_tl.kl_loss import kl_alignment_loss_backward, kl_alignment_loss_forward

    q, k, _ = attention_inputs(B, N, Hq, G, D)
    q_idx = torch.randn(B, N, G, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(B, N, Di, device="cuda", dtype=torch.bfloat16)
    scale, index_scale = 1 / math.sqrt(D), 1 / math.sqrt(Di)
    ref, ref_lse_student = R.kl_alignment_loss(q, k, q_idx, k_idx, None, Bk, scale, index_scale,
                                               return_student_lse=True)
    loss, lse_student = kl_alignment_loss_forward(q, k, q_idx, k_idx, None, Bk, scale, index_scale)
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-5, (loss.item(), ref.item())
    assert (lse_student.double() - ref_lse_student).abs().max().item() <= 1e-3
    dq_idx, dk_idx = kl_alignment_loss_backward(torch.tensor(0.6, device="cuda"), q, k, q_idx, k_idx, None, Bk,
                                                scale, index_scale, None, lse_student)
    ref_dq, ref_dk = R.kl_alignment_loss_backward(0.6, q, k, q_idx, k_idx, None, Bk, scale, index_scale)
    check_close("dq_idx", dq_idx, ref_dq)
    check_close("dk_idx", dk_idx, ref_dk)


@pytest.mark.parametrize("Hq,G,D,Di", [(28, 4, 128, 128), (12, 4, 128, 128), (16, 2, 96, 96), (16, 2, 192, 64)],
                         ids=["R7-qwen", "R3", "D96-Di96", "D192"])
def test_kl_for_layouts_off_the_tiles_runs_padded(Hq, G, D, Di):
    """Through the API: q padded with zero heads (the teacher's mean over the real heads only), q / k and
    q_idx / k_idx with zero dims (head dim 96 -> 128, 192 -> 256; index dim 96 -> 128)."""
    import msa_tl
    from msa_tl.ops import dispatch

    B, N, Bk, topk = 1, 1500, 128, 8
    assert dispatch.kernel_for("kl_alignment_loss", torch.device("cuda"), dtype=torch.bfloat16, heads=Hq, groups=G,
                               head_dim=D, index_dim=Di, block_size=Bk) is not None
    q, k, v = attention_inputs(B, N, Hq, G, D)
    q_idx = torch.randn(B, N, G, Di, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k_idx = torch.randn(B, N, Di, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    indices = selection("random", B, N, G, Bk, topk)
    scale, index_scale = 1 / math.sqrt(D), 1 / math.sqrt(Di)
    ref = R.kl_alignment_loss(q, k, q_idx.detach(), k_idx.detach(), indices, Bk, scale, index_scale)
    ref_dq, ref_dk = R.kl_alignment_loss_backward(1.0, q, k, q_idx.detach(), k_idx.detach(), indices, Bk, scale,
                                                  index_scale)
    _, lse = msa_tl.sparse_attention(q, k, v, indices, block_size=Bk, return_lse=True)
    for teacher_lse in (lse, None):
        q_idx.grad = k_idx.grad = None
        loss = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=Bk, lse=teacher_lse)
        assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-5, (loss.item(), ref.item())
        loss.backward()
        check_close("dq_idx", q_idx.grad, ref_dq)
        check_close("dk_idx", k_idx.grad, ref_dk)


@pytest.mark.parametrize("where", ["k_idx", "q_idx", "k"], ids=["nan-index-key", "nan-index-query", "nan-key"])
def test_a_nan_reaches_the_index_gradients_of_exactly_the_rows_that_chose_it(where):
    """As the reference: a NaN index key / index query / key makes the loss NaN, dq_idx NaN for exactly the
    (query, group) rows whose chosen tokens it reaches, and dk_idx NaN at least where the reference's is and only
    inside blocks those rows chose (the kernels work in whole blocks); every other gradient matches."""
    from msa_tl.kl_loss import kl_alignment_loss_forward

    B, N, Hq, G, D, Di, Bk, topk = 1, 1500, 32, 2, 128, 128, 128, 3
    q, k, _ = attention_inputs(B, N, Hq, G, D)
    q_idx = torch.randn(B, N, G, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(B, N, Di, device="cuda", dtype=torch.bfloat16)
    if where == "k_idx":
        k_idx[0, 1450, 5] = float("nan")  # seen by queries 1450.. of the last block, in both groups
    elif where == "q_idx":
        q_idx[0, 1460, 1, 7] = float("nan")  # one row's student
    else:
        k[0, 1450, 1, 5] = float("nan")  # group 1's teacher for queries 1450..
    indices = selection("hot", B, N, G, Bk, topk)
    scale, index_scale = 1 / math.sqrt(D), 1 / math.sqrt(Di)
    ref_dq, ref_dk = R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    loss, _, dq_idx, dk_idx = kl_alignment_loss_forward(q, k, q_idx, k_idx, indices, Bk, scale, index_scale, None,
                                                        with_grads=True)
    assert torch.isnan(loss)
    assert torch.equal(torch.isnan(dq_idx).any(-1), torch.isnan(ref_dq).any(-1)) and torch.isnan(ref_dq).any()
    poisoned = torch.isnan(ref_dq).any(-1)  # [B, N, G]
    chosen = torch.zeros(B, math.ceil(N / Bk) + 1, dtype=torch.bool, device="cuda")
    blocks = torch.where(poisoned[..., None] & (indices >= 0), indices, chosen.shape[-1] - 1).long()
    chosen.scatter_(-1, blocks.reshape(B, -1), True)
    reachable = chosen[:, :-1].repeat_interleave(Bk, dim=-1)[:, :N, None]  # [B, N, 1]
    assert (torch.isnan(dk_idx) | ~torch.isnan(ref_dk)).all(), "a NaN of the reference is missing"
    assert not (torch.isnan(dk_idx) & ~reachable).any(), "NaN outside the blocks the NaN rows chose"
    check_close("dq_idx", dq_idx[~poisoned], ref_dq[~poisoned])
    clean = ~(torch.isnan(ref_dk) | reachable.expand_as(ref_dk))
    check_close("dk_idx", dk_idx[clean], ref_dk[clean])
