"""KL alignment loss kernels (stats + merge, backward) against the float64 reference (`pytest -m gpu`)."""

import math

import pytest
import torch

from msa_tl import reference as R
from test_main_branch_gpu import attention_inputs, selection

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["random", "realistic", "hot"])
@pytest.mark.parametrize("B,N,Hq,G,D,Di,Bk,topk", [(1, 2125, 64, 4, 128, 128, 128, 16), (2, 1000, 8, 2, 64, 64, 64, 8)],
                         ids=["paper-ragged", "b2-Bk64"])
def test_kl_loss_and_gradients_match_reference(kind, B, N, Hq, G, D, Di, Bk, topk):
    from msa_tl.kl_loss import kl_alignment_loss_backward, kl_alignment_loss_forward

    q, k, _ = attention_inputs(B, N, Hq, G, D)
    q_idx = torch.randn(B, N, G, Di, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(B, N, Di, device="cuda", dtype=torch.bfloat16)
    indices = selection(kind, B, N, G, Bk, topk)
    scale, index_scale = 1 / math.sqrt(D), 1 / math.sqrt(Di)
    loss, lse_student = kl_alignment_loss_forward(q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    ref = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-5, (loss.item(), ref.item())
    dloss = torch.tensor(1.7, device="cuda")
    dq_idx, dk_idx = kl_alignment_loss_backward(dloss, q, k, q_idx, k_idx, indices, Bk, scale, index_scale, lse_student)
    ref_dq, ref_dk = R.kl_alignment_loss_backward(1.7, q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    for name, got, want in (("dq_idx", dq_idx, ref_dq), ("dk_idx", dk_idx, ref_dk)):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape and torch.isfinite(got).all()
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel <= 2e-2, f"{name} rel err {rel:.2e}"
