"""Packed variable-length batches (``cu_seqlens``) and ``local_blocks`` on the GPU kernels (`pytest -m gpu`): the
select kernels with forced blocks and documents (``block_start``), msa_attention forward and backward and the KL
loss per document against the float64 reference on each document alone, a KL row with nothing chosen, and decode
with ``local_blocks``. The checks are tests/test_varlen.py's, which runs each of them on the CPU reference path.
"""

import math

import pytest
import torch

import msa_tl
from msa_tl import reference as R
from msa_tl.checks import LSE_ATOL, OUTPUT_RTOL, POISON_INDEX, relative_error
from msa_tl.ops import dispatch
from test_decode_gpu import decode_case
from test_kl_gpu import check_close
from test_main_branch_gpu import attention_inputs, selection
from test_varlen import (  # noqa: F401  (fresh_seed: the fixed default seed, a fixture)
    assert_decode_selection_up_to_ties,
    assert_selection_up_to_ties,
    block_starts,
    check_packed_attention,
    check_packed_kl,
    documents,
    fresh_seed,
    packed_inputs,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
# ragged documents totalling ~8K tokens: one token, shorter than a block, exactly one block (128), two with more
# blocks than topk = 16 (3000, 2300), none at all
DOCUMENTS = [1, 3000, 130, 0, 2300, 1, 128, 900, 64, 1500, 257, 0]
SELECT_METHODS = ["pipelined", "fused", "two_pass"]
SELECT_SHAPES = pytest.mark.parametrize("B,N,G,Di,Bk,topk", [(2, 3000, 4, 128, 128, 16), (2, 2500, 2, 64, 64, 8),
                                                            (2, 2100, 1, 128, 64, 8)],
                                        ids=["G4-Bk128-k16", "G2-Bk64-k8", "G1-Bk64-k8"])


def index_inputs(B, N, G, Di, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, G, Di, generator=gen).to(CUDA, torch.bfloat16),
            torch.randn(B, N, Di, generator=gen).to(CUDA, torch.bfloat16))


def resolve(local_blocks, topk):
    return topk if local_blocks == "topk" else local_blocks


# ----------------------------------------------------------------------------------------------------------------
# the select kernels


@pytest.mark.parametrize("local_blocks,varlen", [(1, True), (2, False), (2, True), (3, True), ("topk", False),
                                                 ("topk", True)],
                         ids=["L1-docs", "L2", "L2-docs", "L3-docs", "Ltopk", "Ltopk-docs"])
@SELECT_SHAPES
@pytest.mark.parametrize("method", SELECT_METHODS)
def test_select_kernels_force_the_newest_blocks_within_each_document(method, B, N, G, Di, Bk, topk, local_blocks,
                                                                     varlen, fresh_seed):
    """Every select method with local_blocks and block_start (row 0 and row 1 packed differently) against
    reference.select_blocks with the same options, up to bf16 ties; two query chunks for the two-pass path."""
    from msa_tl.index.select import pipelined_rows, select_blocks

    if method == "pipelined" and not pipelined_rows(G, Bk):
        pytest.skip(f"the pipelined select needs G * Bk >= 128 (got {G * Bk})")
    L = resolve(local_blocks, topk)
    q_idx, k_idx = index_inputs(B, N, G, Di, fresh_seed)
    starts = block_starts(B, N, Bk, device=CUDA) if varlen else None
    out = torch.full((B, N, G, topk), POISON_INDEX, device=CUDA, dtype=torch.int32)
    indices = select_blocks(q_idx, k_idx, Bk, topk, local_blocks=L, block_start=starts, method=method,
                            query_chunk=1536, out=out)
    assert indices.data_ptr() == out.data_ptr()
    assert_selection_up_to_ties(indices, q_idx, k_idx, Bk, topk, local_blocks=L, block_start=starts)


@pytest.mark.parametrize("method", SELECT_METHODS)
def test_select_kernels_never_read_another_documents_keys(method, fresh_seed):
    """NaN index keys in one document of each row (row 0's second, blocks 1-2; row 1's first, long one): every other
    document's rows select exactly what they select without the NaN."""
    from msa_tl.index.select import select_blocks

    B, N, G, Di, Bk, topk = 2, 3000, 4, 128, 128, 16
    q_idx, k_idx = index_inputs(B, N, G, Di, fresh_seed)
    starts = block_starts(B, N, Bk, device=CUDA)
    nblk = math.ceil(N / Bk)
    clean = select_blocks(q_idx, k_idx, Bk, topk, local_blocks=2, block_start=starts, method=method)
    poisoned_blocks = [(0, 1, 3), (1, 0, nblk - 4)]  # (row, first block, end block)
    k_bad = k_idx.clone()
    others = torch.ones(B, N, dtype=torch.bool, device=CUDA)
    for b, first, end in poisoned_blocks:
        assert starts[b, first] == first and starts[b, end] == end  # a whole document
        k_bad[b, first * Bk:end * Bk] = float("nan")
        others[b, first * Bk:end * Bk] = False
    got = select_blocks(q_idx, k_bad, Bk, topk, local_blocks=2, block_start=starts, method=method)
    assert torch.equal(got[others], clean[others])
    assert not torch.equal(got[~others], clean[~others])  # the NaN reached its own document's rows


@pytest.mark.parametrize("local_blocks,varlen", [(2, False), (2, True), (3, True), ("topk", True)],
                         ids=["L2", "L2-docs", "L3-docs", "Ltopk-docs"])
@pytest.mark.parametrize("B,N,G,Di,Bk,topk", [(2, 3000, 4, 128, 128, 16), (2, 2500, 2, 64, 64, 8)],
                         ids=["G4-Bk128-k16", "G2-Bk64-k8"])
def test_fp8_select_with_local_blocks_and_documents(B, N, G, Di, Bk, topk, local_blocks, varlen, fresh_seed):
    """select_blocks_fp8 with local_blocks and block_start against the float64 reference over the same quantised
    q_idx / k_idx, up to near-ties (FP8's coarser sums swap more of them: up to 2% of rows, as the FP8 select test)."""
    from msa_tl.index.select import select_blocks_fp8

    L = resolve(local_blocks, topk)
    q_idx, k_idx = index_inputs(B, N, G, Di, fresh_seed)
    starts = block_starts(B, N, Bk, device=CUDA) if varlen else None
    indices = torch.full((B, N, G, topk), POISON_INDEX, device=CUDA, dtype=torch.int32)
    select_blocks_fp8(q_idx, k_idx, Bk, topk, local_blocks=L, block_start=starts, out=indices)
    assert_selection_up_to_ties(indices, R.fake_quantize_fp8(q_idx), R.fake_quantize_fp8(k_idx), Bk, topk,
                                local_blocks=L, block_start=starts, rows_with_ties=1 / 50)


@pytest.mark.parametrize("index_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("G,Di", [(3, 96), (4, 128)], ids=["G3-Di96-padded", "G4"])
def test_packed_select_through_the_api(G, Di, index_fp8, fresh_seed):
    """msa_tl.select_blocks(cu_seqlens=, local_blocks=2) on the kernel (3 index heads and index dim 96 run padded),
    bf16 or FP8 scores: each document's rows the reference's selection on that document alone (over its per-row
    quantised inputs for FP8), ids counted from its start."""
    Bk, topk = 128, 16
    assert dispatch.kernel_for("select_blocks", CUDA, dtype=torch.bfloat16, groups=G, index_dim=Di, block_size=Bk,
                               topk=topk, index_fp8=index_fp8) is not None
    gen = torch.Generator().manual_seed(fresh_seed)
    cu, _, _, _, q_idx, k_idx = packed_inputs(DOCUMENTS, G, G, 8, Di, torch.bfloat16, CUDA, gen)
    indices = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk, local_blocks=2, index_fp8=index_fp8,
                                   cu_seqlens=cu)
    assert indices.shape == (1, sum(DOCUMENTS), G, topk) and indices.dtype == torch.int32
    seen = (R.fake_quantize_fp8(q_idx), R.fake_quantize_fp8(k_idx)) if index_fp8 else (q_idx, k_idx)
    for a, b in documents(cu):
        assert_selection_up_to_ties(indices[:, a:b], seen[0][:, a:b], seen[1][:, a:b], Bk, topk, local_blocks=2,
                                    rows_with_ties=1 / 50 if index_fp8 else 1 / 1000)


# ----------------------------------------------------------------------------------------------------------------
# msa_attention and the KL loss over packed documents


def assert_kernels_run(Hq, G, D, Di, Bk, topk, seq, stages):
    shape = dict(dtype=torch.bfloat16, heads=Hq, groups=G, head_dim=D, index_dim=Di, block_size=Bk, topk=topk,
                 seq=seq)
    for stage in stages:
        assert dispatch.kernel_for(stage, CUDA, **shape) is not None, f"{stage} would run the reference"


@pytest.mark.parametrize("local_blocks", [1, 2])
@pytest.mark.parametrize("Hq", [16, 64])
def test_packed_msa_attention_matches_the_reference_per_document(Hq, local_blocks, fresh_seed):
    """The paper's layout (G = 4, D = Di = 128, Bk = 128, topk = 16) over ~8K packed tokens of ragged documents:
    selection per document up to ties; o, lse, dq, dk, dv within FA3's calibration of the float64 reference run
    on each document alone."""
    G, D, Di, Bk, topk = 4, 128, 128, 128, 16
    assert_kernels_run(Hq, G, D, Di, Bk, topk, sum(DOCUMENTS),
                       ("select_blocks", "sparse_attention", "sparse_attention_backward"))
    gen = torch.Generator().manual_seed(fresh_seed)
    check_packed_attention(DOCUMENTS, Hq, G, D, Di, Bk, topk, local_blocks, torch.bfloat16, CUDA, gen)


def test_packed_msa_attention_keeps_a_poisoned_document_to_itself(fresh_seed):
    """NaN in every input of the 3000-token document: every other document's selection is unchanged, and its
    outputs, lse and gradients finite and equal to the clean run's (to rounding); the NaN reaches its own rows."""
    Hq, G, D, Di, Bk, topk = 16, 4, 128, 128, 128, 16
    gen = torch.Generator().manual_seed(fresh_seed)
    cu, q, k, v, q_idx, k_idx = packed_inputs(DOCUMENTS, Hq, G, D, Di, torch.bfloat16, CUDA, gen)
    do = torch.randn(q.shape, generator=gen).to(CUDA, torch.bfloat16)
    a, b = documents(cu)[1]
    assert b - a == max(DOCUMENTS)
    others = torch.ones(q.shape[1], dtype=torch.bool, device=CUDA)
    others[a:b] = False

    def run(*inputs):
        leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
        o, lse, idx = msa_tl.msa_attention(*leaves, *inputs[3:], block_size=Bk, topk=topk, local_blocks=2,
                                           return_lse=True, return_indices=True, cu_seqlens=cu)
        o.backward(do)
        return o.detach(), lse, idx, *(t.grad for t in leaves)

    clean = run(q, k, v, q_idx, k_idx)
    inputs = [t.clone() for t in (q, k, v, q_idx, k_idx)]
    for t in inputs:
        t[:, a:b] = float("nan")
    got = run(*inputs)
    assert torch.equal(got[2][:, others], clean[2][:, others]), "selection"
    assert torch.isnan(got[1][:, a:b]).all(), "the NaN reaches its own document"
    for name, x, y in zip(("o", "lse", "indices", "dq", "dk", "dv"), got, clean):
        if name == "indices":
            continue
        assert torch.isfinite(x[:, others]).all(), name
        if name == "lse":
            assert (x[:, others] - y[:, others]).abs().max().item() <= 1e-5, name
        else:
            assert relative_error(x[:, others], y[:, others]) <= OUTPUT_RTOL, name


@pytest.mark.parametrize("mode,max_seqlen", [("sparse", None), ("warmup", None), ("warmup", max(DOCUMENTS))],
                         ids=["sparse", "warmup", "warmup-max_seqlen"])
def test_packed_kl_loss_matches_the_reference_per_document(mode, max_seqlen, fresh_seed):
    """kl_alignment_loss(cu_seqlens=) on the kernels: the token-weighted mean of the reference's loss on each
    document alone (a row whose slots are all -1 adds 0), its dq_idx / dk_idx the reference's autograd gradients;
    with the main branch's lse passed as well (sparse)."""
    Hq, G, D, Di, Bk, topk = 16, 4, 128, 128, 128, 16
    assert_kernels_run(Hq, G, D, Di, Bk, topk, sum(DOCUMENTS), ("kl_alignment_loss", "kl_alignment_loss_backward"))
    gen = torch.Generator().manual_seed(fresh_seed)
    check_packed_kl(DOCUMENTS, Hq, G, D, Di, Bk, topk, mode, torch.bfloat16, CUDA, gen, max_seqlen=max_seqlen,
                    loss_rtol=1e-2, grad_rtol=2e-2, lse_rtol=1e-2)


def test_packed_warmup_kl_over_a_document_of_more_than_256_blocks(fresh_seed):
    """The packed warmup hands the KL kernels a selection of ceil(max_seqlen / Bk) slots, as a sparse one: a
    16.5K-token document at Bk = 64 gives 258, past the 256 blocks the unpacked warmup takes on the kernels
    (WARMUP_MAX_BLOCKS: the LSE combine's shared weights), where the unpacked call runs the reference instead. The
    loss and gradients must still be the reference's (or the call must refuse)."""
    Hq, G, D, Di, Bk = 2, 1, 64, 64, 64
    lengths = [16500, 100, 0, 700]
    gen = torch.Generator().manual_seed(fresh_seed)
    check_packed_kl(lengths, Hq, G, D, Di, Bk, 8, "warmup", torch.bfloat16, CUDA, gen, max_seqlen=max(lengths),
                    loss_rtol=1e-2, grad_rtol=2e-2, lse_rtol=1e-2)


def test_a_kl_row_with_nothing_chosen_adds_zero(fresh_seed):
    """Indices with one row all -1 in every group and one in a single group: the GPU loss (with and without the
    main branch's lse) equals the reference, which adds 0 for those rows; they get zero dq_idx."""
    from msa_tl.kl_loss import kl_alignment_loss_forward
    from msa_tl.attention.kv_outer import sparse_attention_forward

    torch.manual_seed(fresh_seed)
    B, N, Hq, G, D, Di, Bk, topk = 1, 1500, 16, 4, 128, 128, 128, 8
    q, k, v = attention_inputs(B, N, Hq, G, D)
    q_idx = torch.randn(B, N, G, Di, device=CUDA, dtype=torch.bfloat16)
    k_idx = torch.randn(B, N, Di, device=CUDA, dtype=torch.bfloat16)
    indices = selection("random", B, N, G, Bk, topk).clone()
    indices[0, 700] = -1
    indices[0, 1200, 2] = -1
    empty = torch.zeros(B, N, G, dtype=torch.bool, device=CUDA)
    empty[0, 700], empty[0, 1200, 2] = True, True
    scale, index_scale = 1 / math.sqrt(D), 1 / math.sqrt(Di)
    ref = R.kl_alignment_loss(q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    ref_dq, ref_dk = R.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, Bk, scale, index_scale)
    assert torch.isfinite(ref) and (ref_dq[empty] == 0).all()
    _, main_lse = sparse_attention_forward(q, k, v, indices, Bk, scale)
    assert torch.isneginf(main_lse[0, 700]).all()
    for lse in (None, main_lse):
        loss, _, dq_idx, dk_idx = kl_alignment_loss_forward(q, k, q_idx, k_idx, indices, Bk, scale, index_scale, lse,
                                                            with_grads=True)
        assert torch.isfinite(loss), "a row with nothing chosen adds 0, not -inf"
        assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-5, (loss.item(), ref.item())
        assert (dq_idx[empty] == 0).all()
        check_close("dq_idx", dq_idx, ref_dq)
        check_close("dk_idx", dk_idx, ref_dk)
    qi, ki = (t.clone().requires_grad_(True) for t in (q_idx, k_idx))
    loss = msa_tl.kl_alignment_loss(q, k, qi, ki, indices, block_size=Bk)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-5, (loss.item(), ref.item())
    check_close("dq_idx (API)", qi.grad, ref_dq)
    check_close("dk_idx (API)", ki.grad, ref_dk)


# ----------------------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("local_blocks", [2, "topk"])
@pytest.mark.parametrize("S,G,Hq,D,Di,Bk,topk,fp8", [(1, 4, 64, 128, 128, 128, 16, False),
                                                     (8, 2, 16, 64, 64, 64, 5, False),
                                                     (3, 4, 64, 128, 128, 128, 16, True)],
                         ids=["decode-paper", "draft-8-Bk64-k5", "fp8-3-paper"])
def test_msa_decode_with_local_blocks_matches_the_reference(S, G, Hq, D, Di, Bk, topk, fp8, local_blocks,
                                                            fresh_seed):
    """msa_decode(local_blocks=L) on the decode kernels (ragged rows, one shorter than a block): the L newest blocks
    in slots 0 .. L-1 (-1 before block 0), the selection the reference's up to bf16 ties, outputs and LSE the
    float64 reference's over that selection."""
    from msa_tl.ops.kernels import _msa_decode_limit

    L = resolve(local_blocks, topk)
    lengths = [S + 5, 1500, 4 * Bk + 9, 3000 + S]
    cache, q, q_idx = decode_case(lengths, S, Hq, G, D, Di, Bk, fresh_seed, fp8=fp8)
    assert _msa_decode_limit(q.device, dtype=q.dtype, heads=Hq, groups=G, head_dim=D, index_dim=Di, block_size=Bk,
                             topk=topk, page_size=Bk) is None, "the reference would run"
    o, lse, idx = msa_tl.msa_decode(q, q_idx, cache, block_size=Bk, topk=topk, local_blocks=L, return_lse=True,
                                    return_indices=True)
    assert o.dtype == q.dtype and o.shape == q.shape and idx.shape == (len(lengths), S, G, topk)
    for b, n in enumerate(lengths):
        local = (n - S + torch.arange(S, device=CUDA))[:, None] // Bk - torch.arange(L, device=CUDA)  # [S, L]
        forced = torch.where(local >= 0, local, -1).int()[:, None].expand(S, G, L)
        assert torch.equal(idx[b, :, :, :L], forced), f"row {b}: the forced slots"
    assert_decode_selection_up_to_ties(idx, q_idx, cache, Bk, topk, local_blocks=L)
    ref_o, ref_lse, _ = R.msa_decode(q, q_idx, cache.k, cache.v, cache.index_keys(), cache.block_table, lengths, Bk,
                                     topk, indices=idx)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert relative_error(o, ref_o) <= OUTPUT_RTOL
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_ATOL
