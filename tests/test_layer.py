"""The trainable MSA layer: modes, outputs, and the gradient detach between the two losses."""

import math

import pytest
import torch

from msa_tl import MSAAttention


def layer(**kw):
    args = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, index_head_dim=8, block_size=16, topk=2)
    args.update(kw)
    return MSAAttention(**args, dtype=torch.float64)


def index_params(m):
    return set(map(id, m.index_parameters()))


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_forward_shapes_and_kl(mode):
    m = layer(mode=mode).train()
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    out = m(x)
    assert out.output.shape == x.shape
    assert out.kl_loss is not None and out.kl_loss.ndim == 0 and out.kl_loss.item() > 0
    assert (out.indices is None) == (mode == "warmup")
    assert m.eval()(x).kl_loss is None


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_lm_loss_gives_exactly_zero_gradient_to_index_projections(mode):
    m = layer(mode=mode).train()
    x = torch.randn(2, 50, 32, dtype=torch.float64, requires_grad=True)
    out = m(x)
    out.output.square().mean().backward()
    for p in m.parameters():
        if id(p) in index_params(m):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_kl_loss_gives_exactly_zero_gradient_to_everything_else(mode):
    m = layer(mode=mode).train()
    x = torch.randn(2, 50, 32, dtype=torch.float64, requires_grad=True)
    m(x).kl_loss.backward()
    assert x.grad is None
    for p in m.parameters():
        if id(p) in index_params(m):
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_warmup_is_dense_and_full_budget_sparse_equals_it():
    m = layer(topk=math.ceil(50 / 16)).eval()
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    sparse = m(x).output
    m.set_mode("warmup")
    torch.testing.assert_close(m(x).output, sparse)


def test_sparse_mode_differs_from_warmup_when_budget_is_short():
    m = layer(topk=1).eval()
    x = torch.randn(1, 80, 32, dtype=torch.float64)
    sparse = m(x).output
    m.set_mode("warmup")
    assert (m(x).output - sparse).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_heads=6, num_kv_heads=4), "multiple"),
        (dict(block_size=48), "block_size"),
        (dict(topk=0), "topk"),
        (dict(mode="dense"), "mode"),
        (dict(head_dim=0), "head_dim"),
    ],
)
def test_bad_configuration_is_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        layer(**kw)


def test_bad_hidden_states_are_rejected():
    with pytest.raises(ValueError, match="hidden_states"):
        layer()(torch.randn(2, 50, 16, dtype=torch.float64))
