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


class DenseGQA(torch.nn.Module):
    """A plain causal GQA attention layer shaped like Llama's (the kind from_dense converts)."""

    def __init__(self, hidden, heads, kv_heads, head_dim, bias):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = torch.nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, h, self.head_dim).transpose(1, 2)
                   for p, h in ((self.q_proj, self.heads), (self.k_proj, self.kv_heads), (self.v_proj, self.kv_heads)))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("bias", [False, True])
def test_from_dense_copies_the_dense_layer_and_adds_fresh_index_projections(bias):
    dense = DenseGQA(48, 6, 2, 8, bias).double()
    layer = MSAAttention.from_dense(dense, num_heads=6, num_kv_heads=2, index_head_dim=8, block_size=16, topk=2)
    assert layer.mode == "warmup" and layer.head_dim == 8 and layer.q_proj.weight.dtype == torch.float64
    x = torch.randn(2, 50, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = dense(x)
        torch.testing.assert_close(layer(x, compute_kl=False).output, expected)
        layer.set_mode("sparse")
        layer.topk = math.ceil(50 / 16)  # every visible block: sparse equals dense
        torch.testing.assert_close(layer(x, compute_kl=False).output, expected)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        source, copy_ = getattr(dense, name), getattr(layer, name)
        assert copy_.weight.data_ptr() != source.weight.data_ptr(), "a copy, not shared storage"
        assert (copy_.bias is None) == (source.bias is None)
    out = layer(x)
    out.kl_loss.backward()
    assert all(p.grad is not None for p in layer.index_parameters())


def test_from_dense_rejects_mismatched_heads():
    dense = DenseGQA(48, 6, 2, 8, False)
    with pytest.raises(ValueError, match="k_proj"):
        MSAAttention.from_dense(dense, num_heads=6, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        MSAAttention.from_dense(dense, num_heads=7, num_kv_heads=1)
    with pytest.raises(ValueError, match="q_proj"):
        MSAAttention.from_dense(torch.nn.Module(), num_heads=6, num_kv_heads=2)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_packed_documents_equal_each_document_alone(mode):
    """cu_seqlens: each document's output, selection, KL share and gradients are what the layer gives it alone (a
    query attending across a border, or a border-crossing KL, would change them)."""
    torch.manual_seed(0)
    m = layer(mode=mode, topk=2, local_blocks=2).train()
    lengths = [37, 1, 70, 16, 5]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64, requires_grad=True)
    out = m(x, cu_seqlens=cu_seqlens)
    (out.output.square().mean() + out.kl_loss).backward()
    packed_grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    x_grad, x.grad = x.grad.clone(), None

    total_loss, outputs, indices = 0.0, [], []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        alone = m(x[:, a:b])
        outputs.append(alone.output)
        indices.append(alone.indices)
        total_loss = total_loss + alone.output.square().sum() / out.output.numel() + alone.kl_loss * (b - a) / x.shape[1]
    total_loss.backward()
    torch.testing.assert_close(out.output, torch.cat(outputs, dim=1), rtol=0, atol=1e-12)
    if mode == "sparse":
        assert torch.equal(out.indices.sort(-1).values, torch.cat(indices, dim=1).sort(-1).values)
    torch.testing.assert_close(x.grad, x_grad, rtol=0, atol=1e-12)
    for name, p in m.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=0, atol=1e-12, msg=name)


def test_local_blocks_are_always_chosen():
    m = layer(topk=3, local_blocks=3, block_size=16).eval()
    out = m(torch.randn(1, 100, 32, dtype=torch.float64))
    own = torch.arange(100) // 16
    expected = torch.stack([own, own - 1, own - 2], -1).clamp(min=-1)[None, :, None]
    expected = torch.where(expected < 0, -1, expected).expand(1, 100, 2, 3).sort(-1).values
    assert torch.equal(out.indices.long().sort(-1).values, expected)


def test_packed_documents_reject_a_batch_or_a_cache():
    m = layer()
    cu_seqlens = torch.tensor([0, 10, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch must be 1"):
        m(torch.randn(2, 20, 32, dtype=torch.float64), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(1, 21, 32, dtype=torch.float64), cu_seqlens=cu_seqlens)
