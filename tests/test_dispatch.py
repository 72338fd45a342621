"""Which calls reach the TileLang kernels, and which fall back to the (logged) reference."""

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
        "kl_alignment_loss": "tilelang", "kl_alignment_loss_backward": "tilelang"}


@pytest.mark.parametrize("change", [dict(dtype=torch.float32), dict(groups=3), dict(index_dim=96),
                                    dict(block_size=256), dict(block_size=32)])
def test_index_shapes_outside_the_kernel_take_the_reference(hopper, change):
    assert not kernels._select_blocks_supported(torch.device("cuda"), **{**PAPER, **change})


@pytest.mark.parametrize("change", [dict(head_dim=96), dict(heads=64, groups=3),
                                    dict(heads=48, groups=1), dict(dtype=torch.float32)])
def test_attention_calls_outside_the_kernel_take_the_reference(hopper, change):
    assert not kernels._sparse_attention_supported(torch.device("cuda"), **{**PAPER, **change})


def test_kernel_for_logs_the_reference_once_per_stage_and_device(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_REPORTED", set())
    cpu = torch.device("cpu")
    for _ in range(3):
        assert dispatch.kernel_for("sparse_attention", cpu, **PAPER) is None
    assert sum("main branch" in r.getMessage() for r in caplog.records) == 1


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
