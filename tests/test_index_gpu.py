"""Index-branch kernels against the float64 reference, on the GPU (`pytest -m gpu`)."""

import math

import pytest
import torch

from msa_tl import reference as R
from msa_tl.checks import (
    POISON_INDEX as POISON,
    assert_attention_matches_reference,
    assert_same_selection_up_to_ties,
    relative_error,
)

pytestmark = pytest.mark.gpu


def index_inputs(B, N, G, Di, dtype=torch.bfloat16):
    return (torch.randn(B, N, G, Di, device="cuda", dtype=dtype),
            torch.randn(B, N, Di, device="cuda", dtype=dtype))


METHODS = [None, "pipelined", "fused", "two_pass"]  # None: the default for the layout


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "B,N,G,Di,Bk,topk",
    [(1, 4096, 4, 128, 128, 16), (2, 1000, 4, 128, 128, 16), (2, 300, 2, 64, 64, 16),
     (1, 2500, 1, 128, 128, 16), (1, 3000, 8, 64, 64, 8), (1, 2048, 2, 128, 128, 4)],
    ids=["paper", "ragged-b2", "N<k*Bk", "G1", "G8-Bk64", "k4"],
)
def test_select_blocks_matches_reference(method, B, N, G, Di, Bk, topk):
    from msa_tl.index.select import select_blocks

    q_idx, k_idx = index_inputs(B, N, G, Di)
    indices = select_blocks(q_idx, k_idx, Bk, topk, method=method, query_chunk=1024)
    assert_same_selection_up_to_ties(indices, q_idx, k_idx, Bk, topk)


@pytest.mark.parametrize("B,N,G,Di,Bk,topk", [(1, 4096, 4, 128, 128, 16), (2, 1000, 4, 128, 128, 16),
                                              (1, 3000, 8, 64, 64, 8)], ids=["paper", "ragged-b2", "G8-Bk64"])
def test_fp8_select_matches_the_reference_over_quantised_inputs(B, N, G, Di, Bk, topk):
    """The FP8 pipelined select against the float64 reference over the same quantised q_idx / k_idx (codes times
    their per-row scales): the chosen sets equal up to near-ties, which FP8's ~14-bit MMA sums swap more often
    than bf16's fp32 ones (a few rows in a hundred, each swapped block within 2^-8 of the boundary)."""
    from msa_tl.index.select import select_blocks_fp8

    q_idx, k_idx = index_inputs(B, N, G, Di)
    indices = torch.full((B, N, G, topk), POISON, device="cuda", dtype=torch.int32)
    select_blocks_fp8(q_idx, k_idx, Bk, topk, out=indices)
    assert_same_selection_up_to_ties(indices, R.fake_quantize_fp8(q_idx), R.fake_quantize_fp8(k_idx), Bk, topk,
                                     rows_with_ties=1 / 50)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "many-ties"])
@pytest.mark.parametrize("N,G,Di,Bk,topk", [(4096, 4, 128, 128, 16), (2500, 1, 128, 128, 8), (1900, 8, 64, 64, 4),
                                            (1000, 2, 64, 64, 16)],
                         ids=["paper", "G1-64-rows", "G8-k4", "G2-Bk64-64-rows"])
def test_pipelined_and_fused_select_the_same_blocks(ties, N, G, Di, Bk, topk):
    """Both fill each row's list in block order: the same choice, ties included, at 64 or 128 rows a consumer."""
    from msa_tl.index.select import select_blocks

    q_idx, k_idx = index_inputs(2, N, G, Di)
    if ties:  # entries in {-1, 0, 1}: block maxima repeat across blocks
        q_idx, k_idx = q_idx.round().clamp(-1, 1), k_idx.round().clamp(-1, 1)
    fused = select_blocks(q_idx, k_idx, Bk, topk, method="fused")
    out = torch.full_like(fused, POISON)
    pipelined = select_blocks(q_idx, k_idx, Bk, topk, method="pipelined", out=out)
    assert torch.equal(pipelined, fused)


SELECT_VARIANTS = [dict(register_max=True), dict(consumers=4, register_max=True), dict(consumers=4)]
VARIANT_IDS = ["register-max", "4-consumers-register-max", "4-consumers"]


@pytest.mark.parametrize("config", SELECT_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "many-ties"])
@pytest.mark.parametrize("N,G,Di,Bk,topk", [(4096, 4, 128, 128, 16), (2500, 1, 128, 128, 8), (1900, 8, 64, 64, 4),
                                            (3000, 4, 128, 128, 5)],
                         ids=["paper", "G1-64-rows", "G8-k4", "k5"])
def test_the_pipelined_selects_consumer_variants_choose_what_the_fused_select_chooses(config, ties, N, G, Di, Bk,
                                                                                     topk):
    """Four consumers of 64 rows, and row maxima taken from the accumulators' registers (a tree, then the quad; the
    list kept by the quad's lanes), fill each row's list with the same maxima in the same block order: the fused
    select's choice bit for bit, ties included."""
    from msa_tl.index.select import pipelined_rows, select_blocks

    if config.get("consumers") == 4 and pipelined_rows(G, Bk) < 128:
        pytest.skip("four consumers need 256 rows in a key block")
    q_idx, k_idx = index_inputs(2, N, G, Di)
    if ties:
        q_idx, k_idx = q_idx.round().clamp(-1, 1), k_idx.round().clamp(-1, 1)
    fused = select_blocks(q_idx, k_idx, Bk, topk, method="fused")
    out = torch.full_like(fused, POISON)
    assert torch.equal(select_blocks(q_idx, k_idx, Bk, topk, method="pipelined", config=config, out=out), fused)


@pytest.mark.parametrize("config", SELECT_VARIANTS[:2], ids=VARIANT_IDS[:2])
@pytest.mark.parametrize("B,N,G,Di,Bk,topk,local_blocks", [(1, 4096, 4, 128, 128, 16, 1), (2, 1000, 4, 128, 128, 16, 1),
                                                           (1, 3000, 4, 128, 128, 8, 2), (1, 3000, 8, 64, 64, 8, 1)],
                         ids=["paper", "ragged-b2", "local-2", "G8-Bk64"])
def test_the_fp8_selects_consumer_variants_choose_what_its_default_chooses(config, B, N, G, Di, Bk, topk,
                                                                           local_blocks):
    """The FP8 select's variants scale the same products by the same key scales and take the same maxima: the
    default build's indices bit for bit (that build is checked against the float64 reference above), and against
    the reference too."""
    from msa_tl.index.select import select_blocks_fp8

    q_idx, k_idx = index_inputs(B, N, G, Di)
    default = select_blocks_fp8(q_idx, k_idx, Bk, topk, local_blocks=local_blocks)
    out = torch.full_like(default, POISON)
    variant = select_blocks_fp8(q_idx, k_idx, Bk, topk, local_blocks=local_blocks, config=config, out=out)
    assert torch.equal(variant, default)
    if local_blocks == 1:
        assert_same_selection_up_to_ties(variant, R.fake_quantize_fp8(q_idx), R.fake_quantize_fp8(k_idx), Bk, topk,
                                         rows_with_ties=1 / 50)


def test_an_unknown_select_method_is_named():
    from msa_tl.index.select import select_blocks

    q_idx, k_idx = index_inputs(1, 256, 4, 128)
    with pytest.raises(ValueError, match="method"):
        select_blocks(q_idx, k_idx, 128, 4, method="serial")


@pytest.mark.parametrize("method", METHODS)
def test_every_slot_of_a_poisoned_output_is_written(method):
    from msa_tl.index.select import select_blocks

    B, N, G, Di, Bk, topk = 2, 1500, 4, 128, 128, 16
    q_idx, k_idx = index_inputs(B, N, G, Di)
    out = torch.full((B, N, G, topk), POISON, device="cuda", dtype=torch.int32)
    indices = select_blocks(q_idx, k_idx, Bk, topk, method=method, query_chunk=512, out=out)
    assert indices.data_ptr() == out.data_ptr()
    assert_same_selection_up_to_ties(indices, q_idx, k_idx, Bk, topk)


@pytest.mark.parametrize("query_start,query_count", [(0, 2000), (512, 1024), (1536, 464)])
def test_block_scores_match_reference(query_start, query_count):
    from msa_tl.index.scores import block_scores

    B, N, G, Di, Bk = 2, 2000, 4, 128, 128
    q_idx, k_idx = index_inputs(B, N, G, Di)
    nblk = math.ceil(N / Bk)
    out = torch.full((B * query_count * G * nblk,), float("nan"), device="cuda")
    S = block_scores(q_idx, k_idx, Bk, None, query_start, query_count, out=out)  # [B, C, G, nblk]
    ref = R.block_scores(q_idx.cpu(), k_idx.cpu(), Bk)[:, :, query_start:query_start + query_count]
    ref = ref.permute(0, 2, 1, 3)  # [B, C, G, nblk]
    t = torch.arange(query_start, query_start + query_count)
    visible = (torch.arange(nblk)[None, :] <= (t // Bk)[:, None])[None, :, None, :].expand_as(ref)
    got = S.cpu().double()
    assert torch.isfinite(got[visible]).all(), "visible block scores left unwritten"
    torch.testing.assert_close(got[visible], ref[visible], rtol=1e-4, atol=1e-4)


def test_msa_attention_selects_with_the_kernel():
    import msa_tl
    from msa_tl.ops.dispatch import kernel_status

    assert kernel_status(torch.device("cuda"))["select_blocks"] == "tilelang"
    B, N, Hq, G, D = 1, 1500, 16, 4, 128
    q = torch.randn(B, N, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, N, G, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q_idx, k_idx = index_inputs(B, N, G, 128)
    o, indices = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=128, topk=4, return_indices=True)
    assert_same_selection_up_to_ties(indices, q_idx, k_idx, 128, 4)
    ref_o, _ = R.sparse_attention(q, k, v, indices, 128)
    rel = relative_error(o, ref_o)
    assert rel < 1e-2, rel


@pytest.mark.parametrize("G,Di", [(3, 128), (6, 128), (4, 96), (16, 128), (12, 64)])
def test_index_groups_outside_the_tiles_select_through_the_api(G, Di):
    """3, 6 or 12 index heads, or index dim 96: the select kernel runs with zero heads (4, 8, 16) or dims (128)
    padded in; 16 index heads run it as they are."""
    import msa_tl

    q_idx, k_idx = index_inputs(1, 2100, G, Di)
    indices = msa_tl.select_blocks(q_idx, k_idx, block_size=128, topk=8)
    assert indices.shape == (1, 2100, G, 8) and indices.is_contiguous()
    assert_same_selection_up_to_ties(indices, q_idx, k_idx, 128, 8)


@pytest.mark.parametrize("B,N,G,Di,Bk,topk", [(1, 4096, 4, 128, 128, 16), (1, 3000, 3, 96, 64, 8)],
                         ids=["paper", "G3-Di96-Bk64-padded"])
def test_fp8_select_through_the_api_matches_the_reference_over_quantised_inputs(B, N, G, Di, Bk, topk):
    """select_blocks(index_fp8=True) runs the FP8 kernel (index heads and dims padded in where needed) and
    msa_attention(index_fp8=True) attends over that selection."""
    import msa_tl

    q_idx, k_idx = index_inputs(B, N, G, Di)
    indices = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk, index_fp8=True)
    assert_same_selection_up_to_ties(indices, R.fake_quantize_fp8(q_idx), R.fake_quantize_fp8(k_idx), Bk, topk,
                                     rows_with_ties=1 / 50)
    q = torch.randn(B, N, 4 * G, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, N, G, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o, lse, chosen = msa_tl.msa_attention(q, k, v, q_idx, k_idx, block_size=Bk, topk=topk, index_fp8=True,
                                          return_lse=True, return_indices=True)
    assert_attention_matches_reference(o, lse, q, k, v, chosen, Bk)
