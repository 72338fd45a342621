"""Which calls reach the TileLang kernels, and which fall back to the (logged) reference."""

import logging

import pytest
import torch

from msa_tl.ops import dispatch, kernels

PAPER = dict(dispatch.PAPER_SHAPE)


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(kernels, "is_hopper", lambda device: True)


def test_cpu_never_takes_a_kernel():
    cpu = torch.device("cpu")
    assert not kernels._select_blocks_supported(cpu, **PAPER)
    assert not kernels._sparse_attention_supported(cpu, **PAPER)
    assert set(dispatch.kernel_status(cpu).values()) == {"reference"}


def test_paper_shape_takes_both_kernels_on_hopper(hopper):
    cuda = torch.device("cuda")
    assert kernels._select_blocks_supported(cuda, **PAPER)
    assert kernels._sparse_attention_supported(cuda, **PAPER)
    assert dispatch.kernel_status(cuda) == {
        "select_blocks": "tilelang", "sparse_attention": "tilelang", "sparse_attention_backward": "tilelang",
        "kl_alignment_loss": "tilelang", "kl_alignment_loss_backward": "tilelang",
        "msa_decode": "tilelang"}


@pytest.mark.parametrize("change", [dict(dtype=torch.float32), dict(page_size=64), dict(block_size=256),
                                    dict(head_dim=256), dict(index_dim=96), dict(heads=128), dict(topk=33)])
def test_decode_shapes_outside_the_kernels_take_the_reference(hopper, change):
    assert kernels._msa_decode_limit(torch.device("cuda"), **{**PAPER, **change}) is not None


@pytest.mark.parametrize("change", [dict(dtype=torch.float32), dict(groups=65), dict(index_dim=256),
                                    dict(block_size=256), dict(block_size=32)])
def test_index_shapes_outside_the_kernel_take_the_reference(hopper, change):
    assert not kernels._select_blocks_supported(torch.device("cuda"), **{**PAPER, **change})


@pytest.mark.parametrize("change", [dict(head_dim=512), dict(heads=128, groups=1), dict(dtype=torch.float32)])
def test_attention_calls_outside_the_kernel_take_the_reference(hopper, change):
    assert not kernels._sparse_attention_supported(torch.device("cuda"), **{**PAPER, **change})


@pytest.mark.parametrize("head_dim,padded", [(256, 256), (192, 256), (160, 256), (96, 128)])
def test_wide_heads_take_every_attention_kernel(hopper, head_dim, padded):
    """Head dims up to 256 run the forward, backward and KL kernels, zero dims padded in up to the next supported one
    (above 128 the attention stages run each block as its 64-key halves)."""
    shape = {**PAPER, "head_dim": head_dim}
    cuda = torch.device("cuda")
    assert kernels.padded_dim(head_dim) == padded
    assert kernels._sparse_attention_supported(cuda, **shape)
    assert dispatch.kernel_for("sparse_attention_backward", cuda, **shape) is not None
    assert kernels._kl_supported(cuda, **shape)
    assert kernels._kl_supported(cuda, **{**shape, "index_dim": 96})  # index dims padded in too


@pytest.mark.parametrize("heads,groups,padded", [(28, 4, 8), (20, 4, 8), (24, 2, 16), (48, 1, 64), (12, 4, 4)])
def test_gqa_ratios_that_do_not_tile_64_rows_take_the_kernels_padded(hopper, heads, groups, padded):
    """Qwen2.5-7B's 28 / 4 heads (ratio 7) and the like run the attention kernels with zero heads padded in, and
    the KL kernel too while the padded ratio is at most 16 (its teacher then averages the real heads only)."""
    shape = {**PAPER, "heads": heads, "groups": groups}
    assert kernels._sparse_attention_supported(torch.device("cuda"), **shape)
    assert kernels.padded_heads(heads // groups) == padded
    assert kernels._kl_supported(torch.device("cuda"), **shape) == (padded <= 16)


@pytest.mark.parametrize("D", [8, 64], ids=["D8-padded-to-64", "D64"])
def test_padded_heads_leave_outputs_and_key_gradients_unchanged(monkeypatch, D):
    """The padding around the kernels, with the float64 reference standing in for them: outputs, lse and dq of
    the real heads and dk / dv equal the unpadded computation (padded heads: q = dO = 0; padded dims: 0)."""
    import msa_tl.attention.kv_outer as fwd
    import msa_tl.attention.backward as bwd
    from msa_tl import reference as R

    calls = []

    def forward(q, k, v, indices, block_size, scale, query_start=0):
        calls.append((q.shape[2], q.shape[3]))
        return R.sparse_attention(q, k, v, indices, block_size, scale, query_start)

    def backward(do, dlse, q, k, v, indices, o, lse, block_size, scale, query_start=0):
        calls.append((q.shape[2], q.shape[3]))
        return R.sparse_attention_backward(do, dlse, q, k, v, indices, block_size, scale, query_start=query_start)

    monkeypatch.setattr(fwd, "sparse_attention_forward", forward)
    monkeypatch.setattr(bwd, "sparse_attention_backward", backward)
    B, N, G, Rh, Bk, topk = 2, 50, 2, 7, 16, 3
    q, do = torch.randn(B, N, G * Rh, D, dtype=torch.float64), torch.randn(B, N, G * Rh, D, dtype=torch.float64)
    k, v = torch.randn(B, N, G, D, dtype=torch.float64), torch.randn(B, N, G, D, dtype=torch.float64)
    indices = R.topk_blocks(torch.randn(B, G, N, 4, dtype=torch.float64), topk, Bk)
    o, lse = kernels._sparse_attention(q, k, v, indices, block_size=Bk, scale=0.3)
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, Bk, 0.3)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(lse, ref_lse)
    grads = kernels._sparse_attention_backward(do, None, q, k, v, indices, o, lse, block_size=Bk, scale=0.3)
    for got, want in zip(grads, R.sparse_attention_backward(do, None, q, k, v, indices, Bk, 0.3)):
        torch.testing.assert_close(got, want)
    assert calls == [(G * 8, 64)] * 2 and o.is_contiguous() and all(g.shape == t.shape for g, t in zip(grads, (q, k, v)))


def test_kernel_for_logs_the_reference_once_per_stage_and_device(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_REPORTED", set())
    cpu = torch.device("cpu")
    for _ in range(3):
        assert dispatch.kernel_for("sparse_attention", cpu, **PAPER) is None
    assert sum("main branch" in r.getMessage() for r in caplog.records) == 1


def test_the_reference_log_names_the_limit_once_per_limit(hopper, monkeypatch, caplog):
    """A fallback says which limit the call hit; a second call with another limit says so too."""
    monkeypatch.setattr(dispatch, "_REPORTED", set())
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="msa_tl"):
        for _ in range(2):
            assert dispatch.kernel_for("select_blocks", cuda, **{**PAPER, "groups": 128}) is None
        assert dispatch.kernel_for("sparse_attention", cuda, **{**PAPER, "head_dim": 512}) is None
        assert dispatch.kernel_for("kl_alignment_loss", cuda, **{**PAPER, "dtype": torch.float32}) is None
        assert dispatch.kernel_for("select_blocks", cuda, **{**PAPER, "block_size": 32}) is None
    messages = [r.getMessage() for r in caplog.records if r.name == "msa_tl"]
    assert len(messages) == 4, messages
    for message, limit in zip(messages, ("128 index heads (at most 64)", "head dim 512 (at most 256)",
                                         "torch.float32 inputs", "block size 32")):
        assert limit in message, (limit, message)
    assert dispatch.kernel_for("select_blocks", cuda, **PAPER) is not None


def test_register_kernel_rejects_unknown_stages():
    with pytest.raises(ValueError, match="unknown stage"):
        dispatch.register_kernel("decode", lambda: None, lambda device, **shape: True)


def test_kv_outer_runs_at_every_length_unless_forced(monkeypatch):
    """Measured (H100, main_paths.csv): Q-outer is slower at every length from 2K to 128K, so no crossover."""
    monkeypatch.delenv("MSA_TL_ATTENTION_PATH", raising=False)
    assert [kernels.attention_path(n) for n in (1, 2048, 32768, 1 << 20)] == ["kv_outer"] * 4


def test_attention_path_can_be_forced_and_rejects_unknown_paths(monkeypatch):
    monkeypatch.setenv("MSA_TL_ATTENTION_PATH", "q_outer")
    assert kernels.attention_path(1 << 20) == "q_outer"
    monkeypatch.setenv("MSA_TL_ATTENTION_PATH", "fastest")
    with pytest.raises(ValueError, match="MSA_TL_ATTENTION_PATH"):
        kernels.attention_path(1024)


def test_warmup_kl_takes_the_kernel_while_its_full_selection_stays_small(hopper):
    cuda = torch.device("cuda")
    warmup = dict(PAPER, sparse=False, batch=1)
    assert kernels._kl_supported(cuda, **warmup, seq=8192)
    assert kernels._kl_supported(cuda, **warmup, seq=kernels.WARMUP_MAX_BLOCKS * 128)
    assert not kernels._kl_supported(cuda, **warmup, seq=kernels.WARMUP_MAX_BLOCKS * 128 + 1)  # one block too many
    assert not kernels._kl_supported(cuda, **dict(warmup, batch=64), seq=16384)  # 2**28 (query, group, block) entries
    assert kernels._kl_supported(cuda, **dict(PAPER, sparse=True, batch=64), seq=1 << 20)  # sparse: no such bound


def test_causal_selection_lists_every_visible_block_once():
    from msa_tl import reference as R
    from msa_tl.kl_loss import causal_selection

    B, N, G, Bk = 2, 70, 3, 16
    chosen = causal_selection(B, N, G, Bk, "cpu")
    assert chosen.dtype == torch.int32 and chosen.shape == (B, N, G, 5) and chosen.is_contiguous()
    q_idx, k_idx = torch.randn(B, N, G, 8, dtype=torch.float64), torch.randn(B, N, 8, dtype=torch.float64)
    every = R.select_blocks(q_idx, k_idx, Bk, 5)  # the reference's full budget, in score order
    assert torch.equal(chosen.sort(-1).values, every.sort(-1).values)


@pytest.mark.parametrize("groups,padded", [(3, 4), (5, 8), (6, 8), (7, 8), (12, 16), (16, 16), (40, 64)])
def test_index_groups_outside_the_tiles_take_the_kernel_padded(hopper, monkeypatch, groups, padded):
    """3, 5, 6, 7, 12, 40 index heads run the select kernel with zero index heads padded in (and index dim 8 with zero
    dims, to 64); the real heads' selection is the unpadded one (the float64 reference stands in for the kernel)."""
    import msa_tl.index.select as index_topk
    from msa_tl import reference as R

    assert kernels._select_blocks_supported(torch.device("cuda"), **{**PAPER, "groups": groups})
    seen = []

    def select(q_idx, k_idx, block_size, topk, index_scale, *, local_blocks, block_start, query_start):
        assert query_start == 0
        seen.append((q_idx.shape[2], q_idx.shape[3], k_idx.shape[2]))
        return R.select_blocks(q_idx, k_idx, block_size, topk, local_blocks=local_blocks, block_start=block_start)

    monkeypatch.setattr(index_topk, "select_blocks", select)
    q_idx, k_idx = torch.randn(2, 70, groups, 8, dtype=torch.float64), torch.randn(2, 70, 8, dtype=torch.float64)
    got = kernels._select_blocks(q_idx, k_idx, block_size=16, topk=3, index_scale=None)
    assert seen == [(padded, 64, 64)] and got.is_contiguous()
    assert torch.equal(got, R.select_blocks(q_idx, k_idx, 16, 3))



def test_kl_kernel_gets_zero_heads_and_dims_padded_in_and_the_real_head_count(monkeypatch):
    """Ratio 7 -> 8 heads, head dim 96 -> 128, index dim 96 -> 128 on the way in; the index gradients cut back."""
    import msa_tl.kl_loss as kl

    seen = {}

    def forward(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse, *, with_grads, mean_heads,
                query_start):
        seen.update(q=q, k=k, q_idx=q_idx, k_idx=k_idx, lse=lse, mean_heads=mean_heads)
        return "loss", "lse_student", q_idx + 1, k_idx + 2  # shaped as the kernel's index gradients

    monkeypatch.setattr(kl, "kl_alignment_loss_forward", forward)
    B, N, G, Rh, D, Di = 1, 10, 4, 7, 96, 96
    q, k = torch.randn(B, N, G * Rh, D), torch.randn(B, N, G, D)
    q_idx, k_idx = torch.randn(B, N, G, Di), torch.randn(B, N, Di)
    lse = torch.randn(B, N, G * Rh)
    loss, _, dq_idx, dk_idx = kernels._kl_alignment_loss(q, k, q_idx, k_idx, None, lse, block_size=16, scale=1.0,
                                                         index_scale=1.0, with_grads=True)
    assert loss == "loss" and seen["mean_heads"] == Rh
    assert seen["q"].shape == (B, N, G * 8, 128) and seen["lse"].shape == (B, N, G * 8)
    assert seen["k"].shape == (B, N, G, 128) and seen["q_idx"].shape == (B, N, G, 128)
    assert seen["k_idx"].shape == (B, N, 128)
    padded_q, padded_lse = seen["q"].view(B, N, G, 8, 128), seen["lse"].view(B, N, G, 8)
    assert torch.equal(padded_q[:, :, :, :Rh, :D], q.view(B, N, G, Rh, D)) and (padded_q[:, :, :, Rh:] == 0).all()
    assert (padded_q[..., D:] == 0).all() and (seen["k"][..., D:] == 0).all()
    assert torch.equal(seen["q_idx"][..., :Di], q_idx) and (seen["q_idx"][..., Di:] == 0).all()
    assert torch.equal(padded_lse[:, :, :, :Rh], lse.view(B, N, G, Rh)) and (padded_lse[:, :, :, Rh:] == 0).all()
    assert torch.equal(dq_idx, q_idx + 1) and torch.equal(dk_idx, k_idx + 2)  # cut back to the caller's Di


def test_queries_at_an_offset_reach_the_kernels_without_rows_before_them(monkeypatch):
    """The attention forward, backward and KL wrappers at query_start t0: the kernels' drivers (the float64 reference
    stands in for them) get the chunk's query-side rows alone with query_start, and the wrappers return what the
    reference at the offset does."""
    import msa_tl.attention.backward as backward
    import msa_tl.attention.kv_outer as kv_outer
    import msa_tl.kl_loss as kl
    from msa_tl import reference as R

    seen = []

    def forward(q, k, v, indices, block_size, scale, query_start):
        seen.append((q.shape[1], indices.shape[1], query_start))
        return R.sparse_attention(q, k, v, indices, block_size, scale, query_start)

    def grads(do, dlse, q, k, v, indices, o, lse, block_size, scale, query_start):
        seen.append((q.shape[1], indices.shape[1], query_start))
        return R.sparse_attention_backward(do, dlse, q, k, v, indices, block_size, scale, query_start=query_start)

    def kl_forward(q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse, *, with_grads, mean_heads,
                   query_start):
        seen.append((q.shape[1], indices.shape[1], query_start))
        loss, lse_student = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size, scale, index_scale,
                                                return_student_lse=True, lse=lse, query_start=query_start)
        return (loss, lse_student, *R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, block_size, scale,
                                                                 index_scale, lse=lse, query_start=query_start))

    def kl_backward(dloss, q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse, lse_student, *,
                    mean_heads, query_start):
        seen.append((q.shape[1], indices.shape[1], query_start))
        return R.kl_alignment_loss_backward(dloss, q, k, q_idx, k_idx, indices, block_size, scale, index_scale, lse=lse,
                                            query_start=query_start)

    monkeypatch.setattr(kv_outer, "sparse_attention_forward", forward)
    monkeypatch.setattr(backward, "sparse_attention_backward", grads)
    monkeypatch.setattr(kl, "kl_alignment_loss_forward", kl_forward)
    monkeypatch.setattr(kl, "kl_alignment_loss_backward", kl_backward)
    B, N, G, Hq, D, Di, Bk, topk, t0 = 2, 96, 2, 4, 64, 64, 16, 3, 40
    f64 = torch.float64
    q, do = torch.randn(B, N - t0, Hq, D, dtype=f64), torch.randn(B, N - t0, Hq, D, dtype=f64)
    k, v = torch.randn(B, N, G, D, dtype=f64), torch.randn(B, N, G, D, dtype=f64)
    q_idx, k_idx = torch.randn(B, N - t0, G, Di, dtype=f64), torch.randn(B, N, Di, dtype=f64)
    indices = R.select_blocks(q_idx, k_idx, Bk, topk, query_start=t0)
    options = dict(block_size=Bk, scale=0.125, query_start=t0)

    o, lse = kernels._sparse_attention(q, k, v, indices, **options)
    want_o, want_lse = R.sparse_attention(q, k, v, indices, Bk, 0.125, query_start=t0)
    assert o.shape == q.shape and torch.allclose(o, want_o) and torch.allclose(lse, want_lse)
    got = kernels._sparse_attention_backward(do, None, q, k, v, indices, o, lse, **options)
    want = R.sparse_attention_backward(do, None, q, k, v, indices, Bk, 0.125, query_start=t0)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and torch.allclose(a, b), name
    loss, lse_student, dq_idx, dk_idx = kernels._kl_alignment_loss(q, k, q_idx, k_idx, indices, lse, index_scale=0.5,
                                                                   with_grads=True, **options)
    want_loss = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, 0.125, 0.5, query_start=t0)
    want_dq_idx, want_dk_idx = R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk, 0.125, 0.5,
                                                            query_start=t0)
    assert torch.allclose(loss, want_loss) and lse_student.shape == (B, N - t0, G)
    assert torch.allclose(dq_idx, want_dq_idx) and torch.allclose(dk_idx, want_dk_idx)
    dq_idx, dk_idx = kernels._kl_alignment_loss_backward(torch.tensor(0.5, dtype=f64), q, k, q_idx, k_idx, indices,
                                                         lse, lse_student, index_scale=0.5, **options)
    assert torch.allclose(dq_idx, 0.5 * want_dq_idx) and torch.allclose(dk_idx, 0.5 * want_dk_idx)
    assert seen == [(N - t0, N - t0, t0)] * 4  # every driver got the chunk's rows and its offset
