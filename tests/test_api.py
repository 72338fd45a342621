"""The public functional API: results, dtypes, dispatch logging and input validation."""

import logging
import math

import pytest
import torch

import msa_tl
from msa_tl import reference as R
from msa_tl.ops import dispatch


def inputs(B=2, N=70, Hq=4, G=2, D=16, Di=8, dtype=torch.float32):
    return (
        torch.randn(B, N, Hq, D, dtype=dtype),
        torch.randn(B, N, G, D, dtype=dtype),
        torch.randn(B, N, G, D, dtype=dtype),
        torch.randn(B, N, G, Di, dtype=dtype),
        torch.randn(B, N, Di, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_msa_attention_matches_reference(dtype):
    q, k, v, q_idx, k_idx = inputs(dtype=dtype)
    o, lse, indices = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=16, topk=2, return_lse=True, return_indices=True)
    ref_o, ref_lse, ref_idx = R.msa_forward(q, k, v, q_idx, k_idx, 16, 2)
    assert o.dtype == dtype and o.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert indices.dtype == torch.int32 and indices.shape == (2, 70, 2, 2)
    assert torch.equal(indices, ref_idx)
    torch.testing.assert_close(o, ref_o.to(dtype))
    torch.testing.assert_close(lse, ref_lse.float())


def test_return_forms_and_four_dim_k_idx():
    q, k, v, q_idx, k_idx = inputs()
    o = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=16, topk=2)
    o2, idx = msa_tl.msa_attention(q, k, v, q_idx, k_idx.unsqueeze(2), block_size=16, topk=2, return_indices=True)
    assert isinstance(o, torch.Tensor) and torch.equal(o, o2) and idx.shape[-1] == 2


def test_stage_functions_compose_to_msa_attention():
    q, k, v, q_idx, k_idx = inputs()
    indices = msa_tl.select_blocks(q_idx, k_idx, block_size=32, topk=2)
    o = msa_tl.sparse_attention(q, k, v, indices, block_size=32)
    torch.testing.assert_close(o, msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=32, topk=2))
    loss = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=32)
    assert loss.dtype == torch.float32 and loss.item() > 0


def test_reference_path_is_announced_once_per_stage(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_REPORTED", set())
    q, k, v, q_idx, k_idx = inputs(N=20)
    with caplog.at_level(logging.WARNING, logger="msa_tl"):
        for _ in range(3):
            msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=16, topk=2)
    messages = [r.getMessage() for r in caplog.records if r.name == "msa_tl"]
    assert len(messages) == 2, messages  # index branch + main branch, once each
    assert all("float64 reference on cpu" in m for m in messages)


def test_gradients_flow_through_main_branch_only():
    q, k, v, q_idx, k_idx = (t.requires_grad_() for t in inputs())
    msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=16, topk=2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    assert q_idx.grad is None and k_idx.grad is None


def _call(**overrides):
    q, k, v, q_idx, k_idx = inputs(N=40)
    args = dict(q=q, k=k, v=v, q_idx=q_idx, k_idx=k_idx)
    options = dict(block_size=16, topk=2)
    for key, value in overrides.items():
        (args if key in args else options)[key] = value(args[key]) if callable(value) and key in args else value
    return msa_tl.msa_attention(**args, **options)


BAD_INPUTS = [
    ("q", TypeError, dict(q=lambda t: t.to(torch.int32))),
    ("k", TypeError, dict(k=lambda t: t.double())),
    ("q", TypeError, dict(q=lambda t: t.numpy())),
    ("k", ValueError, dict(k=lambda t: t.to("meta"))),
    ("q", ValueError, dict(q=lambda t: t[:, :, :, None])),
    ("q", ValueError, dict(q=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))),
    ("k", ValueError, dict(k=lambda t: t[:, :30].contiguous())),
    ("v", ValueError, dict(v=lambda t: t[..., :8].contiguous())),
    ("head dim", ValueError, dict(k=lambda t: t[..., :8].contiguous(), v=lambda t: t[..., :8].contiguous())),
    ("multiple of kv heads", ValueError, dict(k=lambda t: torch.randn(2, 40, 3, 16), v=lambda t: torch.randn(2, 40, 3, 16))),
    ("q_idx", ValueError, dict(q_idx=lambda t: t[:, :, :1].contiguous())),
    ("k_idx", ValueError, dict(k_idx=lambda t: t[..., :4].contiguous())),
    ("k_idx", ValueError, dict(k_idx=lambda t: t[:, :, None].expand(2, 40, 2, 8).contiguous())),
    ("block_size", ValueError, dict(block_size=100)),
    ("block_size", ValueError, dict(block_size=8)),
    ("topk", ValueError, dict(topk=0)),
    ("topk", ValueError, dict(topk=65)),
    ("topk", ValueError, dict(topk=2.0)),
    ("head dim >= 1", ValueError, dict(q=lambda t: t[..., :0].contiguous(), k=lambda t: t[..., :0].contiguous(),
                                       v=lambda t: t[..., :0].contiguous())),
    ("index dim >= 1", ValueError, dict(q_idx=lambda t: t[..., :0].contiguous(), k_idx=lambda t: t[..., :0].contiguous())),
    ("q_idx has dtype", TypeError, dict(q_idx=lambda t: t.bfloat16(), k_idx=lambda t: t.bfloat16())),
    ("q_idx is on meta", ValueError, dict(q_idx=lambda t: t.to("meta"), k_idx=lambda t: t.to("meta"))),
    ("scale", ValueError, dict(scale=-1.0)),
    ("index_scale", ValueError, dict(index_scale=float("nan"))),
]


@pytest.mark.parametrize("name,error,overrides", BAD_INPUTS, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_rejected_naming_the_argument(name, error, overrides):
    with pytest.raises(error, match=name):
        _call(**overrides)


def test_sparse_attention_rejects_bad_indices():
    q, k, v, _, _ = inputs(N=40)
    good = torch.zeros(2, 40, 2, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="indices must be int32"):
        msa_tl.sparse_attention(q, k, v, good.long(), block_size=16)
    with pytest.raises(ValueError, match="indices"):
        msa_tl.sparse_attention(q, k, v, good[:, :39].contiguous(), block_size=16)


def hostile_indices(B, N, G, Bk, topk, generator=None):
    """Ids anywhere in -1 .. nblk + 2: future blocks, ids past the end, repeats, and rows of only -1."""
    nblk = math.ceil(N / Bk)
    ids = torch.randint(-1, nblk + 3, (B, N, G, topk), generator=generator, dtype=torch.int32)
    ids[:, ::7, :, 1] = ids[:, ::7, :, 0]  # a repeat in every seventh row
    ids[:, 3::11] = -1  # rows with no block at all
    return ids


def test_canonical_indices_keep_the_visible_set_once():
    from msa_tl.ops.validation import canonical_indices

    B, N, G, Bk, topk = 2, 90, 2, 16, 5
    raw = hostile_indices(B, N, G, Bk, topk)
    canon = canonical_indices(raw, Bk)
    own = (torch.arange(N) // Bk).view(1, N, 1)
    for b, t, g in [(b, t, g) for b in range(B) for t in range(N) for g in range(G)]:
        row = canon[b, t, g].tolist()
        visible = {i for i in raw[b, t, g].tolist() if 0 <= i <= own[0, t, 0]}
        assert sorted(i for i in row if i >= 0) == sorted(visible), (b, t, g, raw[b, t, g].tolist(), row)
    assert canon.dtype == torch.int32 and canon.shape == raw.shape


def test_hostile_indices_follow_the_set_contract():
    """Any int32 ids through the API give the reference's set semantics; empty rows give o = 0, lse = -inf."""
    q, k, v, _, _ = inputs(N=90, dtype=torch.float64)
    raw = hostile_indices(2, 90, 2, 16, 5)
    o, lse = msa_tl.sparse_attention(q, k, v, raw, block_size=16, return_lse=True)
    ref_o, ref_lse = R.sparse_attention(q, k, v, raw, 16)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(lse.double(), ref_lse.float().double())
    empty = (raw[:, 3::11] < 0).all()
    assert empty and (o[:, 3::11] == 0).all() and (lse[:, 3::11] == float("-inf")).all()


def test_full_budget_through_the_api_equals_dense():
    q, k, v, q_idx, k_idx = inputs(dtype=torch.float64)
    o = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=16, topk=math.ceil(70 / 16))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(o, dense)


def test_kl_loss_rejects_a_bad_main_branch_lse():
    q, k, v, q_idx, k_idx = inputs(N=40)
    indices = msa_tl.select_blocks(q_idx, k_idx, block_size=16, topk=2)
    _, lse = msa_tl.sparse_attention(q, k, v, indices, block_size=16, return_lse=True)
    for bad, error, match in ((lse.double(), TypeError, "lse must be float32"),
                              (lse[:, :39].contiguous(), ValueError, r"lse must be \[batch, seq, heads\]"),
                              (lse.transpose(1, 2), ValueError, "lse must be contiguous")):
        with pytest.raises(error, match=match):
            msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=16, lse=bad)
    given = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=16, lse=lse)
    torch.testing.assert_close(given, msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=16))
    # the lse is the teacher's normaliser on this path as in the kernels: a wrong one changes the loss
    wrong = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=16, lse=lse + 1.0)
    assert abs(wrong.item() - given.item()) > 1e-2 * abs(given.item())


def test_fp8_index_selects_as_the_reference_over_the_quantised_inputs():
    """index_fp8: the selection of q_idx / k_idx quantised per row to e4m3 (not of the bf16 values: with these
    inputs the two differ), through select_blocks, msa_attention and the layer."""
    torch.manual_seed(1)
    q, k, v, q_idx, k_idx = inputs(B=1, N=300, Di=16)
    expected = R.select_blocks(R.fake_quantize_fp8(q_idx), R.fake_quantize_fp8(k_idx), 16, 4)
    assert not torch.equal(expected, R.select_blocks(q_idx, k_idx, 16, 4))
    got = msa_tl.select_blocks(q_idx, k_idx, block_size=16, topk=4, index_fp8=True)
    assert torch.equal(got, expected)
    _, indices = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=16, topk=4, index_fp8=True,
                                      return_indices=True)
    assert torch.equal(indices, expected)


def test_kl_loss_backward_runs_after_the_main_branch_freed_its_graph():
    """The KL's teacher is detached inside the op: its graph holds the index branch alone, so a backward of it after
    the LM loss's (which frees the main branch's graph) neither fails nor reaches q / k."""
    q0, k0, v, q_idx, k_idx = inputs(B=1, N=64)
    q0, k0 = q0.requires_grad_(True), k0.requires_grad_(True)
    q, k = q0.exp(), k0.exp()  # nodes whose saved tensors the LM backward frees, as a projection's are
    q_idx.requires_grad_(True)
    o, lse, indices = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=16, topk=2, return_lse=True,
                                           return_indices=True)
    kl = msa_tl.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size=16, lse=lse)
    o.square().sum().backward()
    dq = q0.grad.clone()
    kl.backward()
    assert torch.equal(q0.grad, dq) and q_idx.grad is not None and q_idx.grad.abs().sum() > 0
