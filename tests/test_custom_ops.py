"""The custom ops: schema / fake / autograd registration (opcheck), gradcheck, and torch.compile without graph breaks."""

import copy

import pytest
import torch

import msa_tl
from msa_tl import reference as R
from msa_tl.ops import MSAAttention
from msa_tl.ops.custom_ops import (
    kl_alignment_loss_backward_op,
    kl_alignment_loss_op,
    select_blocks_op,
    sparse_attention_backward_op,
    sparse_attention_op,
)

B, N, Hq, G, D, Di, Bk, TOPK = 2, 80, 4, 2, 8, 6, 16, 3


def inputs(requires_grad=False, B=B, N=N, Hq=Hq, G=G, D=D, Di=Di):
    q, k, v = (torch.randn(B, N, h, D, dtype=torch.float64, requires_grad=requires_grad) for h in (Hq, G, G))
    q_idx = torch.randn(B, N, G, Di, dtype=torch.float64, requires_grad=requires_grad)
    k_idx = torch.randn(B, N, Di, dtype=torch.float64, requires_grad=requires_grad)
    return q, k, v, q_idx, k_idx


def test_opcheck_every_op():
    q, k, v, q_idx, k_idx = inputs(requires_grad=True)
    indices = R.select_blocks(q_idx.detach(), k_idx.detach(), Bk, TOPK)
    o, lse = sparse_attention_op(q, k, v, indices, Bk, 0.3)
    cases = [
        (select_blocks_op, (q_idx.detach(), k_idx.detach(), Bk, TOPK, 0.5)),
        (sparse_attention_op, (q, k, v, indices, Bk, 0.3)),
        (sparse_attention_backward_op, (torch.randn_like(o), torch.randn_like(lse), q.detach(), k.detach(), v.detach(),
                                        indices, o.detach(), lse.detach(), Bk, 0.3)),
        (kl_alignment_loss_op, (q, k, q_idx, k_idx, indices, lse.detach(), Bk, 0.3, 0.5)),
        (kl_alignment_loss_op, (q, k, q_idx, k_idx, indices, None, Bk, 0.3, 0.5, True)),
        (kl_alignment_loss_op, (q, k, q_idx, k_idx, None, None, Bk, 0.3, 0.5)),
        (kl_alignment_loss_op, (q, k, q_idx, k_idx, None, None, Bk, 0.3, 0.5, True)),
        (kl_alignment_loss_backward_op, (torch.tensor(1.3, dtype=torch.float64), q.detach(), k.detach(),
                                         q_idx.detach(), k_idx.detach(), indices, lse.detach(),
                                         torch.randn(B, N, G, dtype=torch.float64), Bk, 0.3, 0.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_gradcheck_through_the_ops():
    q, k, v, q_idx, k_idx = inputs(requires_grad=True, B=1, N=37, Hq=4, G=2, D=4, Di=3)  # 37 queries: three 16-key blocks
    indices = R.select_blocks(q_idx.detach(), k_idx.detach(), 16, 2)
    torch.autograd.gradcheck(lambda q, k, v: msa_tl.sparse_attention(q, k, v, indices, block_size=16), (q, k, v))
    for sel in (indices, None):
        torch.autograd.gradcheck(
            lambda qi, ki: msa_tl.kl_alignment_loss(q.detach(), k.detach(), qi, ki, sel, block_size=16), (q_idx, k_idx))


def test_lse_gradient_flows_through_the_attention_op():
    q, k, v, q_idx, k_idx = inputs(requires_grad=True)
    indices = R.select_blocks(q_idx.detach(), k_idx.detach(), Bk, TOPK)
    _, lse = msa_tl.sparse_attention(q, k, v, indices, block_size=Bk, return_lse=True)
    weights = torch.randn_like(lse)
    (lse * weights).sum().backward()
    expected = R.sparse_attention_backward(torch.zeros(B, N, Hq, D, dtype=torch.float64), weights.double(),
                                           q.detach(), k.detach(), v.detach(), indices, Bk)
    for got, leaf in zip(expected, (q, k, v)):
        torch.testing.assert_close(leaf.grad, got, rtol=1e-5, atol=1e-6)  # lse is float32


def test_kl_loss_gives_no_gradient_to_the_teacher():
    q, k, v, q_idx, k_idx = inputs(requires_grad=True)
    loss = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, None, block_size=Bk)
    loss.backward()
    assert q.grad is None and k.grad is None
    assert q_idx.grad is not None and q_idx.grad.abs().sum() > 0 and k_idx.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_layer_compiles_without_graph_breaks_and_matches_eager(mode):
    torch.manual_seed(0)
    layer = MSAAttention(32, num_heads=4, num_kv_heads=2, head_dim=8, index_head_dim=8, block_size=16, topk=2,
                         mode=mode).double().train()
    compiled_layer = copy.deepcopy(layer)
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises

    def run(module, params):
        out = module(x)
        (out.output.square().mean() + out.kl_loss).backward()
        return out, {name: p.grad.clone() for name, p in params.named_parameters()}

    torch._dynamo.reset()
    (eager_out, eager_grads), (comp_out, comp_grads) = run(layer, layer), run(compiled, compiled_layer)
    torch.testing.assert_close(comp_out.output, eager_out.output)
    torch.testing.assert_close(comp_out.kl_loss, eager_out.kl_loss)
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], msg=name)
