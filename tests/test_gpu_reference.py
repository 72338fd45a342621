"""The reference and the API on a CUDA device (run on the GPU machine with `pytest -m gpu`)."""

import pytest
import torch

import msa_tl
from msa_tl import reference as R
from msa_tl.checks import relative_error

pytestmark = pytest.mark.gpu


def test_reference_on_cuda_equals_reference_on_cpu():
    B, N, Hq, G, D, Di = 2, 333, 8, 2, 32, 32
    cpu = [torch.randn(B, N, Hq, D), torch.randn(B, N, G, D), torch.randn(B, N, G, D),
           torch.randn(B, N, G, Di), torch.randn(B, N, Di)]
    gpu = [t.cuda() for t in cpu]
    o_c, lse_c, idx_c = R.msa_forward(*cpu, 32, 4)
    o_g, lse_g, idx_g = R.msa_forward(*gpu, 32, 4)
    assert torch.equal(idx_g.cpu(), idx_c)
    torch.testing.assert_close(o_g.cpu(), o_c, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse_g.cpu(), lse_c, rtol=1e-10, atol=1e-10)


def test_api_on_cuda_bf16_forward_backward():
    B, N, Hq, G, D = 1, 512, 8, 2, 64
    q = torch.randn(B, N, Hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, N, G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, N, G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q_idx = torch.randn(B, N, G, 64, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(B, N, 64, device="cuda", dtype=torch.bfloat16)
    o, idx = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=64, topk=8, return_indices=True)
    full = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    rel = relative_error(o, full)
    assert rel < 1e-2, rel  # topk * block = N: MSA is dense attention
    o.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_cuda_rejects_float32():
    q = torch.randn(1, 16, 2, 16, device="cuda")
    with pytest.raises(TypeError, match="q has dtype"):
        msa_tl.msa_attention(q, q[:, :, :1].contiguous(), q[:, :, :1].contiguous(),
                             q[:, :, :1].contiguous(), q[:, :, 0].contiguous(), block_size=16, topk=1)


def test_layer_trains_on_cuda():
    m = msa_tl.MSAAttention(128, 8, 2, 32, 32, block_size=64, topk=2).cuda().to(torch.bfloat16).train()
    x = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    out = m(x)
    (out.output.float().square().mean() + out.kl_loss).backward()
    assert m.index_q_proj.weight.grad.abs().sum() > 0 and m.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_layer_kl_runs_the_kernels_and_matches_reference(mode, caplog, monkeypatch):
    from msa_tl.ops import dispatch

    monkeypatch.setattr(dispatch, "_REPORTED", set())
    hidden, H, G, D, Di, Bk = 256, 8, 2, 64, 64, 64
    m = msa_tl.MSAAttention(hidden, H, G, D, Di, block_size=Bk, topk=4, mode=mode).cuda().to(torch.bfloat16).train()
    x = torch.randn(2, 700, hidden, device="cuda", dtype=torch.bfloat16)
    out = m(x)
    out.kl_loss.backward()
    assert not [r for r in caplog.records if "KL" in r.getMessage()], "the KL ran the reference"
    B, N, _ = x.shape
    # the reference KL of the same projections, in float64, and its gradients for the index projections
    with torch.no_grad():
        q = m.q_proj(x).view(B, N, H, D)
        k = m.k_proj(x).view(B, N, G, D)
    w_q, w_k = (p.weight.detach().double().requires_grad_() for p in (m.index_q_proj, m.index_k_proj))
    q_idx = (x.double() @ w_q.T).view(B, N, G, Di)
    k_idx = x.double() @ w_k.T
    ref = R.kl_alignment_loss(q, k, q_idx, k_idx, out.indices, Bk)
    ref.backward()
    assert abs(out.kl_loss.item() - ref.item()) <= 2e-2 * abs(ref.item()), (out.kl_loss.item(), ref.item())
    for got, want in ((m.index_q_proj.weight.grad, w_q.grad), (m.index_k_proj.weight.grad, w_k.grad)):
        rel = relative_error(got, want)
        assert rel <= 5e-2, rel
