"""Numerical checks of kernel outputs against the float64 reference, shared by the GPU tests and the autotuner.

Each raises ``AssertionError`` with what was wrong; the tuner records that as a failed trial.
"""

import math

import torch

from msa_tl import reference as R

POISON_INDEX = -7  # int32 fill for index outputs; any survivor is an unwritten slot
OUTPUT_RTOL = 1e-2  # bf16 main-branch output, relative Frobenius error
LSE_ATOL = 1e-3


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius norms, in float64)."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def assert_same_selection_up_to_ties(indices, q_idx, k_idx, block_size, topk, *, rows_with_ties=1 / 1000):
    """Every row: local block present, nothing from the future, min(topk, local+1) distinct blocks and -1
    elsewhere (slot order is not part of the contract), and the chosen set equal to the reference's except for
    blocks whose reference score ties the selection boundary within bf16 rounding, in at most ``rows_with_ties``
    of the rows (FP8 scoring's coarser sums swap more near-ties, never a block far from the boundary)."""
    B, N, G, _ = q_idx.shape
    assert indices.dtype == torch.int32 and indices.shape == (B, N, G, topk)
    idx = indices.cpu().long()
    assert not (idx == POISON_INDEX).any(), "unwritten slots"
    t = torch.arange(N)
    local = (t // block_size)[None, :, None]
    assert (idx == local[..., None]).any(-1).all(), "the local block is chosen"  # in any slot: order is free
    count = torch.clamp(local + 1, max=topk)
    assert ((idx >= 0).sum(-1) == count).all(), "min(topk, local+1) slots used"
    assert ((idx >= 0) | (idx == -1)).all(), "unused slots hold -1"
    assert (idx <= local[..., None]).all(), "no block from the future"
    chosen = torch.zeros(B, N, G, math.ceil(N / block_size) + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(idx < 0, chosen.shape[-1] - 1, idx), True)
    assert (chosen[..., :-1].sum(-1) == count).all(), "duplicate blocks"

    ref = R.select_blocks(q_idx.cpu(), k_idx.cpu(), block_size, topk).long()
    ref_chosen = torch.zeros_like(chosen)
    ref_chosen.scatter_(-1, torch.where(ref < 0, chosen.shape[-1] - 1, ref), True)
    differ = (chosen != ref_chosen).any(-1).nonzero().tolist()
    if not differ:
        return
    scores = R.block_scores(q_idx.cpu(), k_idx.cpu(), block_size)  # [B, G, N, nblk] float64
    for b, t_, g in differ:
        row = scores[b, g, t_, : t_ // block_size].clone()  # non-local visible blocks
        boundary = row.sort(descending=True).values[topk - 2].item()  # the (k-1)-th best score
        for blk in (chosen[b, t_, g, :-1] ^ ref_chosen[b, t_, g, :-1]).nonzero().flatten().tolist():
            gap = abs(row[blk].item() - boundary)
            assert gap <= 2**-8 * max(1.0, abs(boundary)), (b, t_, g, blk, gap)
    allowed = max(2, int(B * N * G * rows_with_ties))
    assert len(differ) <= allowed, f"{len(differ)} rows differ: more ties than rounding explains"


def assert_decode_selection_up_to_ties(idx, q_idx, cache, Bk, topk, index_scale=None):
    """Decode's selection idx [B, S, G, topk] for q_idx [B, S, G, Di] over ``cache`` (an MSACache). Per row: the local block in slot 0 and the reference's chosen set, except blocks whose float64 score ties the
    selection boundary within bf16 rounding. FP8 caches: the reference scores the dequantised keys against q_idx
    quantised as the scan quantises it; rescoring ones: the exact keys against q_idx (the selection the two stages
    reach where the exact choice lies within the FP8 stage's candidates)."""
    B, S, G, _ = q_idx.shape
    q_idx = R.fake_quantize_fp8(q_idx) if cache.index_fp8 and not cache.rescore else q_idx
    index_keys = cache.k_idx_exact if cache.rescore else cache.index_keys()
    for b, n in enumerate(cache.lengths):
        keys = R.cached_rows(index_keys, cache.block_table, b, n)[None]
        scores = R._pool_blocks(R.index_token_scores(q_idx[b:b + 1], keys, index_scale, n - S), Bk)  # [1, G, S, nblk]
        want = R.topk_blocks(scores, topk, Bk, query_start=n - S)[0]  # [S, G, topk]
        local = (n - S + torch.arange(S, device=idx.device)) // Bk
        assert torch.equal(idx[b, :, :, 0], local[:, None].expand(S, G).int()), f"row {b}: slot 0"
        for s in range(S):
            for g in range(G):
                got_set = set(idx[b, s, g].tolist()) - {-1}
                want_set = set(want[s, g].tolist()) - {-1}
                assert len(got_set) == (idx[b, s, g] >= 0).sum().item() == len(want_set), (b, s, g)
                row = scores[0, g, s, :int(local[s])]
                if got_set != want_set:
                    boundary = row.sort(descending=True).values[min(topk - 1, row.numel()) - 1].item()
                    for blk in got_set ^ want_set:
                        gap = abs(row[blk].item() - boundary)
                        assert gap <= 2**-8 * max(1.0, abs(boundary)), (b, s, g, blk, gap)


def assert_attention_matches_reference(o, lse, q, k, v, indices, block_size):
    """o [B, N, Hq, D] within OUTPUT_RTOL (relative) and lse [B, N, Hq] within LSE_ATOL of the float64 reference."""
    assert torch.isfinite(o).all() and torch.isfinite(lse).all(), "unwritten or non-finite outputs"
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, block_size)
    rel = relative_error(o, ref_o)
    assert rel <= OUTPUT_RTOL, f"output rel err {rel:.2e}"
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert lse_err <= LSE_ATOL, f"lse err {lse_err:.2e}"


# Random inputs and whole-path checks of the autotuner's GPU trials (the TunableProgram.gpu_trial of each kernel
# module): bf16 on the GPU, batch 1.

def index_inputs(shape: dict, seq: int) -> tuple:
    """q_idx [1, seq, G, Di] and k_idx [1, seq, Di], random bf16 on the GPU."""
    return (torch.randn(1, seq, shape["groups"], shape["index_dim"], device="cuda", dtype=torch.bfloat16),
            torch.randn(1, seq, shape["index_dim"], device="cuda", dtype=torch.bfloat16))


def attention_inputs(shape: dict, seq: int) -> tuple:
    """q, k, v and a valid selection from the index kernels (random projections), on the GPU."""
    from msa_tl.index.select import select_blocks

    q = torch.randn(1, seq, shape["heads"], shape["head_dim"], device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, seq, shape["groups"], shape["head_dim"], device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    indices = select_blocks(*index_inputs(shape, seq), shape["block_size"], shape["topk"])
    return q, k, v, indices


def check_selection(shape: dict, seq: int, select) -> None:
    """``select(q_idx, k_idx, out)`` fills out [1, seq, G, topk] with the reference's choice, up to ties."""
    q_idx, k_idx = index_inputs(shape, seq)
    out = torch.full((1, seq, shape["groups"], shape["topk"]), POISON_INDEX, device="cuda", dtype=torch.int32)
    select(q_idx, k_idx, out)
    assert_same_selection_up_to_ties(out, q_idx, k_idx, shape["block_size"], shape["topk"])


def check_attention(shape: dict, seq: int, forward) -> None:
    """``forward(q, k, v, indices, o, lse)`` fills o and lse as the reference's sparse attention at ``seq``."""
    q, k, v, indices = attention_inputs(shape, seq)
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    forward(q, k, v, indices, o, lse)
    assert_attention_matches_reference(o, lse, q, k, v, indices, shape["block_size"])
