"""Decode kernels against the float64 reference (`pytest -m gpu`): the index scan over a paged cache, the top-k, the
split attention, the whole step through ``msa_decode`` (paged and contiguous caches, ragged rows, S 1 to 40), its
replay from a CUDA graph after appends, and the layer generating with a cache."""

import pytest
import torch

from msa_tl import reference as R
from msa_tl.checks import assert_decode_selection_up_to_ties

pytestmark = pytest.mark.gpu


CASES = pytest.mark.parametrize("S,G", [(1, 4), (8, 4), (40, 2), (3, 1)], ids=["decode", "draft-8", "chunk-40", "G1"])
BLOCKS = pytest.mark.parametrize("Bk", [128, 64])


def paged_index_keys(S, G, Bk, seed, lengths=None, max_pages=24, Di=128):
    """Ragged rows (one shorter than a block, one ending mid-block, one long) of index keys in shuffled pages."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths = lengths or [S + 40, 1000, 5 * Bk + 17]
    B = len(lengths)
    table = torch.randperm(B * max_pages, device="cuda", generator=gen).view(B, max_pages).int()
    k_idx_pages = torch.randn(B * max_pages, Bk, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
    q_idx = torch.randn(B, S, G, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q_idx, k_idx_pages, table, torch.tensor(lengths, device="cuda", dtype=torch.int32), lengths


@CASES
@BLOCKS
@pytest.mark.parametrize("keys_major,shuffle_max", [(True, False), (False, False), (True, True)])
def test_decode_scores_match_the_reference_over_shuffled_pages(S, G, Bk, keys_major, shuffle_max, seed=0):
    """Ragged rows (one shorter than a block, one ending mid-block, one long), pages in random order, the grid
    from the cache's maxima: visible blocks to fp32 accumulation, every other entry -inf. ``shuffle_max``: each
    block's max from the accumulator's registers (warp shuffles), not a transpose through shared memory."""
    from msa_tl.decode.scores import decode_block_scores

    q_idx, k_idx_pages, table, seqlens, lengths = paged_index_keys(S, G, Bk, seed)
    B, max_pages = len(lengths), table.shape[1]
    got = decode_block_scores(q_idx, k_idx_pages, table, seqlens, Bk, keys_major=keys_major, shuffle_max=shuffle_max)
    assert got.shape == (B, S, G, max_pages)
    for b, n in enumerate(lengths):
        keys = R.cached_rows(k_idx_pages, table, b, n)[None]
        want = R._pool_blocks(R.index_token_scores(q_idx[b:b + 1], keys, None, n - S), Bk)[0]  # [G, S, nblk]
        want = torch.nn.functional.pad(want, (0, max_pages - want.shape[-1]), value=float("-inf"))
        row = got[b].permute(1, 0, 2).double()  # [G, S, max_pages]
        assert torch.equal(torch.isneginf(row), torch.isneginf(want)), f"row {b}: -inf entries differ"
        seen = torch.isfinite(want)
        assert (row[seen] - want[seen]).abs().max().item() <= 1e-4, f"row {b}"


@CASES
@BLOCKS
@pytest.mark.parametrize("topk", [16, 5])
def test_decode_select_takes_the_local_block_and_the_best_earlier_ones(S, G, Bk, topk, seed=0):
    """On the kernel's own block scores (some poisoned with NaN, which never wins): slot 0 the local block, the
    other slots the reference's top-k set (rows with fewer earlier blocks than k - 1 pad with -1)."""
    from msa_tl.decode.scores import decode_block_scores
    from msa_tl.decode.topk import decode_select

    q_idx, k_idx_pages, table, seqlens, lengths = paged_index_keys(S, G, Bk, seed, lengths=[S, 1000, 3000], max_pages=48)
    scores = decode_block_scores(q_idx, k_idx_pages, table, seqlens, Bk)
    scores.view(-1)[::97] = float("nan")
    idx = decode_select(scores, seqlens, Bk, topk)
    assert idx.shape == (len(lengths), S, G, topk)
    for b, n in enumerate(lengths):
        local = (n - S + torch.arange(S, device="cuda")) // Bk
        assert torch.equal(idx[b, :, :, 0], local[:, None].expand(S, G).int()), f"row {b}: slot 0"
        want = R.topk_blocks(scores[b].permute(1, 0, 2)[None].double(), topk, Bk, query_start=n - S)[0]
        big = torch.iinfo(torch.int32).max  # -1 (unused) sorts last on both sides
        got_set = torch.where(idx[b] < 0, big, idx[b]).sort(-1).values
        want_set = torch.where(want < 0, big, want).sort(-1).values
        assert torch.equal(got_set, want_set), f"row {b}"


ATTENTION_VARIANTS = pytest.mark.parametrize(
    "variant", [dict(union=False), dict(union=False, pipelined=True), dict(union=True), dict(union=True, tokens=4),
                dict(union=True, num_stages=1), dict(union=True, skip_idle=True), {}],
    ids=["per-pair", "per-pair-pipelined", "union", "union-4-tokens", "union-1-stage", "union-skip-idle", "default"])


@ATTENTION_VARIANTS
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("S,G,Hq,D,Bk,topk", [(1, 4, 64, 128, 128, 16), (8, 4, 64, 128, 128, 16),
                                              (3, 2, 8, 64, 64, 5), (2, 1, 16, 128, 64, 6)],
                         ids=["decode-paper", "draft-8-paper", "R4-D64-Bk64", "G1-R16"])
def test_decode_attention_matches_the_reference_over_shuffled_pages(S, G, Hq, D, Bk, topk, splits, variant,
                                                                   seed=0):
    """Each row's newest tokens over the reference's own selection (-1 slots in the short row), the slots (or with
    ``union`` each chunk of tokens' union of blocks) split over CTAs and combined: outputs and LSE against the
    float64 reference (the library's main-branch bounds)."""
    from msa_tl.checks import LSE_ATOL, OUTPUT_RTOL, relative_error
    from msa_tl.decode.attention import decode_attention

    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths, max_pages, Di = [S + 3, 1500, 4 * Bk + 9], 24, 64
    B = len(lengths)
    table = torch.randperm(B * max_pages, device="cuda", generator=gen).view(B, max_pages).int()
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    k_pages, v_pages, k_idx_pages = rand(B * max_pages, Bk, G, D), rand(B * max_pages, Bk, G, D), \
        rand(B * max_pages, Bk, Di)
    q, q_idx = rand(B, S, Hq, D), rand(B, S, G, Di)
    seqlens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    ref_o, ref_lse, indices = R.msa_decode(q, q_idx, k_pages, v_pages, k_idx_pages, table, lengths, Bk, topk)
    o, lse = decode_attention(q, k_pages, v_pages, table, seqlens, indices, Bk, splits=splits, **variant)
    assert o.dtype == q.dtype and torch.isfinite(o).all() and torch.isfinite(lse).all()
    rel = relative_error(o, ref_o)
    assert rel <= OUTPUT_RTOL, f"output rel err {rel:.2e}"
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_ATOL


@ATTENTION_VARIANTS
@pytest.mark.parametrize("G,Hq,D,Bk", [(4, 64, 128, 128), (2, 8, 64, 64)], ids=["paper", "R4-D64-Bk64"])
def test_a_nan_in_k_or_v_reaches_exactly_the_tokens_that_chose_its_block(G, Hq, D, Bk, variant, seed=0):
    """Eight draft tokens a row, each choosing its local block, a block of its own and a block every token chose. A NaN in K of a block one token chose makes that token's
    rows of the group NaN (output and LSE); a NaN in V of another token's own block makes that token's output NaN
    in the value's column. Every other entry is finite and matches the float64 reference: the union kernels'
    tile shares blocks between tokens, and their P V MMA must not carry a neighbour's NaN into a row (0 * NaN)."""
    from msa_tl.checks import LSE_ATOL, OUTPUT_RTOL, relative_error
    from msa_tl.decode.attention import decode_attention

    gen = torch.Generator(device="cuda").manual_seed(seed)
    S, topk, lengths, max_pages = 8, 5, [40 * Bk + 3, 33 * Bk + 70], 48
    B = len(lengths)
    table = torch.randperm(B * max_pages, device="cuda", generator=gen).view(B, max_pages).int()
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    k_pages, v_pages, k_idx_pages = rand(B * max_pages, Bk, G, D), rand(B * max_pages, Bk, G, D), \
        rand(B * max_pages, Bk, 64)
    q, q_idx = rand(B, S, Hq, D), rand(B, S, G, 64)
    seqlens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    indices = torch.full((B, S, G, topk), -1, device="cuda", dtype=torch.int32)
    for b, n in enumerate(lengths):
        for t in range(S):
            indices[b, t, :, :3] = torch.tensor([(n - S + t) // Bk, 2 * t + 3, 1], dtype=torch.int32)
    g, nan_k_token, nan_v_token, column = G - 1, 5, 2, D // 3
    for blk, token, cache in ((2 * nan_k_token + 3, nan_k_token, k_pages), (2 * nan_v_token + 3, nan_v_token, v_pages)):
        cache[table[0, blk], 17, g, column] = float("nan")
    ref_o, ref_lse, _ = R.msa_decode(q, q_idx, k_pages, v_pages, k_idx_pages, table, lengths, Bk, topk,
                                     indices=indices)
    o, lse = decode_attention(q, k_pages, v_pages, table, seqlens, indices, Bk, splits=2, **variant)
    R_ = Hq // G
    heads = slice(g * R_, (g + 1) * R_)
    assert torch.isnan(ref_lse[0, nan_k_token, heads]).all() and torch.isnan(ref_o[0, nan_v_token, heads, column]).all()
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse)), "NaN LSE exactly where the reference has it"
    assert torch.equal(torch.isnan(o), torch.isnan(ref_o)), "NaN outputs exactly where the reference has them"
    keep = ~torch.isnan(ref_o)
    assert relative_error(o[keep], ref_o[keep]) <= OUTPUT_RTOL
    finite = ~torch.isnan(ref_lse)
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() <= LSE_ATOL


def decode_case(B_lengths, S, Hq, G, D, Di, Bk, seed, contiguous=False, max_pages=None, fp8=False, rescore=False):
    """A bf16 cache holding ragged rows (pages shuffled unless ``contiguous``; FP8 index keys with a scale per token
    if ``fp8``, and the bf16 keys they quantise beside them if ``rescore``) and the newest S tokens' queries."""
    from msa_tl.ops.cache import MSACache

    gen = torch.Generator(device="cuda").manual_seed(seed)
    B = len(B_lengths)
    max_pages = max_pages or -(-max(B_lengths) // Bk)
    table = (torch.arange(B * max_pages, device="cuda") if contiguous
             else torch.randperm(B * max_pages, device="cuda", generator=gen)).view(B, max_pages).int()
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    k_idx, k_idx_scale, exact = rand(B * max_pages, Bk, Di), None, None
    if fp8:
        exact = (k_idx * (1 + torch.rand(B * max_pages, Bk, 1, device="cuda", generator=gen))).bfloat16()
        k_idx, k_idx_scale = R.quantize_fp8(exact)
    cache = MSACache(rand(B * max_pages, Bk, G, D), rand(B * max_pages, Bk, G, D), k_idx, table, B_lengths,
                     k_idx_scale=k_idx_scale, k_idx_exact=exact if rescore else None)
    return cache, rand(B, S, Hq, D), rand(B, S, G, Di)


STEP_CASES = pytest.mark.parametrize(
    "S,G,Hq,D,Di,Bk,topk,contiguous,fp8",
    [(1, 4, 64, 128, 128, 128, 16, False, False), (8, 4, 64, 128, 128, 128, 16, True, False),
     (40, 2, 16, 64, 64, 64, 8, False, False), (1, 1, 16, 128, 128, 64, 16, True, False),
     (3, 2, 14, 128, 64, 128, 5, False, False), (1, 4, 64, 128, 128, 128, 16, False, True),
     (8, 2, 16, 64, 64, 64, 8, True, True)],
    ids=["decode-paper-paged", "draft-8-contiguous", "chunk-40-Bk64", "G1-contiguous", "R7-paged",
         "fp8-decode-paper-paged", "fp8-draft-8-Bk64-contiguous"])


@STEP_CASES
def test_msa_decode_runs_the_kernels_and_matches_the_reference(S, G, Hq, D, Di, Bk, topk, contiguous, fp8, seed=0):
    """The whole step through msa_decode (scan, top-k, split attention and combine on the GPU): selection up to bf16 ties, outputs and LSE against the float64 reference over the kernel's selection."""
    from msa_tl.ops.kernels import _msa_decode_limit

    lengths = [S + 5, 1500, 4 * Bk + 9, 3000 + S]
    cache, q, q_idx = decode_case(lengths, S, Hq, G, D, Di, Bk, seed, contiguous=contiguous, fp8=fp8)
    assert _msa_decode_limit(q.device, dtype=q.dtype, heads=Hq, groups=G, head_dim=D, index_dim=Di, block_size=Bk,
                             topk=topk, page_size=Bk) is None, "the reference would run"
    assert_decode_step_matches_the_reference(cache, q, q_idx, Bk, topk)


def assert_decode_step_matches_the_reference(cache, q, q_idx, Bk, topk):
    """msa_decode on the kernels: the selection up to bf16 ties (:func:`assert_decode_selection_up_to_ties`), outputs
    and LSE against the float64 reference over the kernel's selection."""
    import msa_tl
    from msa_tl.checks import LSE_ATOL, OUTPUT_RTOL, relative_error

    o, lse, idx = msa_tl.msa_decode(q, q_idx, cache, block_size=Bk, topk=topk, return_lse=True, return_indices=True)
    assert o.dtype == q.dtype and o.shape == q.shape and idx.shape == (*q_idx.shape[:3], topk)
    assert_decode_selection_up_to_ties(idx, q_idx, cache, Bk, topk)
    ref_o, ref_lse, _ = R.msa_decode(q, q_idx, cache.k, cache.v, cache.index_keys(), cache.block_table,
                                     cache.lengths, Bk, topk, indices=idx)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert relative_error(o, ref_o) <= OUTPUT_RTOL
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_ATOL


@pytest.mark.parametrize("pdl,fp8", [(False, False), (True, False), (True, True)],
                         ids=["plain", "pdl", "pdl-fp8-rescore"])
def test_a_cuda_graph_of_the_plan_replays_after_appends(pdl, fp8, seed=0):
    """Capture one step of a plan, then append tokens (seqlens and pages change in place), write the new queries
    into the captured inputs and replay: each replay equals msa_decode run eagerly on the same cache. With
    ``pdl`` (each kernel waits on griddepcontrol for the one before it and lets the next launch at its end) the
    plan's eager step is also the plain launches' bit for bit; ``fp8``: FP8 keys with the bf16 rescore."""
    import msa_tl

    S, G, Hq, D, Di, Bk, topk = 1, 4, 64, 128, 128, 128, 16
    lengths = [700, 2000, 129]
    cache, q, q_idx = decode_case(lengths, S, Hq, G, D, Di, Bk, seed, max_pages=24, fp8=fp8, rescore=fp8)
    plan = cache.plan(queries=S, heads=Hq, topk=topk, pdl=pdl)
    k, v, keys = cache.k, cache.v, (cache.k_idx, cache.k_idx_scale, cache.k_idx_exact)
    first = plan.run(q, q_idx, k, v, *keys)  # compile and warm up outside the capture
    if pdl:
        plain = cache.plan(queries=S, heads=Hq, topk=topk).run(q, q_idx, k, v, *keys)
        assert all(torch.equal(a, b) for a, b in zip(first, plain))
    assert_graph_replays_after_appends(
        cache, q, q_idx, lambda: plan.run(q, q_idx, k, v, *keys),
        lambda: msa_tl.msa_decode(q, q_idx, cache, block_size=Bk, topk=topk, return_lse=True, return_indices=True),
        steps=3, seed=seed)


def assert_graph_replays_after_appends(cache, q, q_idx, step, eager, steps: int, seed: int):
    """Capture ``step()`` (-> o, lse, indices) in a CUDA graph, then ``steps`` times append a random token to every
    row, write new queries into the captured q / q_idx and replay: (o, lse, indices) equal ``eager()``'s bit for
    bit."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse, idx = step()
    B, S, Hq, D = q.shape
    G, Di = q_idx.shape[2:]
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    for i in range(steps):
        rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
        cache.append(rand(B, S, G, D), rand(B, S, G, D), rand(B, S, Di))
        q.copy_(rand(B, S, Hq, D))
        q_idx.copy_(rand(B, S, G, Di))
        o.fill_(float("nan"))
        graph.replay()
        want_o, want_lse, want_idx = eager()
        assert torch.equal(idx, want_idx), i
        assert torch.equal(o, want_o) and torch.equal(lse, want_lse), i


@pytest.mark.parametrize("waves,S,fp8", [(2, 1, False), (4, 1, True), (2, 8, False)],
                         ids=["2-waves", "4-waves-fp8-rescore", "2-waves-draft-8"])
def test_a_plan_in_waves_steps_as_one_wave_does_eagerly_and_from_a_graph(waves, S, fp8, seed=0):
    """Rows in waves (each wave's selection and attention on a second stream under the next wave's scan): with the
    same split count, the step's outputs, LSE and indices equal the one-wave plan's bit for bit, eagerly and
    replayed from a CUDA graph after appends (the fork and join are captured); the stage methods refuse it."""
    G, Hq, D, Di, Bk, topk = 4, 64, 128, 128, 128, 16
    lengths = [700 + 37 * r for r in range(8)]
    cache, q, q_idx = decode_case(lengths, S, Hq, G, D, Di, Bk, seed, max_pages=24, fp8=fp8, rescore=fp8)
    k, v, keys = cache.k, cache.v, (cache.k_idx, cache.k_idx_scale, cache.k_idx_exact)
    one = cache.plan(queries=S, heads=Hq, topk=topk, splits=4)
    plan = cache.plan(queries=S, heads=Hq, topk=topk, splits=4, waves=waves)
    for got, want in zip(plan.run(q, q_idx, k, v, *keys), one.run(q, q_idx, k, v, *keys)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="run"):
        plan.index_scores(q_idx, cache.k_idx, cache.k_idx_scale)
    with pytest.raises(ValueError, match="waves"):
        cache.plan(queries=S, heads=Hq, topk=topk, waves=3)
    assert_graph_replays_after_appends(cache, q, q_idx, lambda: plan.run(q, q_idx, k, v, *keys),
                                       lambda: one.run(q, q_idx, k, v, *keys), steps=2, seed=seed)


def test_the_layer_generates_the_full_forward_rows_with_the_decode_kernels(seed=0):
    """bf16 layer on the GPU: prefill through the prefill kernels into a paged cache, then single tokens and an
    8-token draft through the decode kernels; each step's rows equal the full forward's (selection up to ties,
    output to bf16 rounding)."""
    import msa_tl
    from msa_tl import MSACache
    from msa_tl.checks import OUTPUT_RTOL, relative_error

    torch.manual_seed(seed)
    B, N, hidden, H, G, D, Di, Bk, topk = 2, 1100, 512, 16, 2, 128, 128, 128, 4
    layer = msa_tl.MSAAttention(hidden, H, G, D, Di, block_size=Bk, topk=topk, device="cuda",
                                dtype=torch.bfloat16).eval()
    x = torch.randn(B, N, hidden, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        full = layer(x)
        cache = MSACache.paged(B, N, G, D, Di, page_size=Bk, device="cuda", dtype=torch.bfloat16,
                               block_table=torch.randperm(B * 9, device="cuda").view(B, 9).int())
        t = 0
        for S in (1000, 1, 1, 8, 1):
            out = layer(x[:, t:t + S], cache=cache)
            same = (out.indices == full.indices[:, t:t + S]).float().mean().item()
            assert same >= 0.99, (t, S, same)  # a bf16 tie may swap a block between the two paths
            assert relative_error(out.output, full.output[:, t:t + S]) <= OUTPUT_RTOL, (t, S)
            t += S


@pytest.mark.parametrize("S,G,Bk", [(1, 4, 128), (8, 4, 128), (5, 2, 64), (40, 2, 128)])
@pytest.mark.parametrize("keys_major,pages,shuffle_max", [(True, 1, False), (False, 1, False), (True, 2, False),
                                                           (True, 1, True), (True, 2, True)])
def test_fp8_decode_scores_match_the_reference_over_shuffled_pages(S, G, Bk, keys_major, pages, shuffle_max, seed=0):
    """FP8 keys (codes and a scale per token) and queries whose per-row FP8 quantisation is exact (codes times a
    power of two, each row reaching 448 times it), so the float64 reference sees the scan's very operands: every
    other entry -inf, visible blocks to the FP8 wgmma's accumulation. Hopper's FP8 MMA keeps about 14 bits of its
    running sum (DeepSeek-V3's report measures the same on the H800), so an entry may be off by some 2^-14 of the
    sum of |q_i k_i| behind it, not of the score: the bound is 2^-10 of that sum. (A bound of 1e-3 of the score
    failed at S = 40 on the H200 by 1.03e-3, every entry 1e-4 to 1e-3 off: rounding, not a wrong block.)"""
    from msa_tl.decode.scores import decode_block_scores

    gen = torch.Generator(device="cuda").manual_seed(seed)
    _, k_idx_bf16, table, seqlens, lengths = paged_index_keys(S, G, Bk, seed)
    B, max_pages, Di = len(lengths), table.shape[1], k_idx_bf16.shape[-1]
    codes, k_scale = R.quantize_fp8(k_idx_bf16 * (1 + torch.rand(*k_idx_bf16.shape[:2], 1, device="cuda",
                                                                  generator=gen)))
    q_codes = torch.randn(B, S, G, Di, device="cuda", generator=gen).mul(64).clamp(-448, 448).to(torch.float8_e4m3fn)
    q_codes[..., 0] = 448.0
    q_idx = (q_codes.float() * 2.0**-6).to(torch.bfloat16)  # exact in bf16: 4-bit mantissas
    got = decode_block_scores(q_idx, codes, table, seqlens, Bk, k_idx_scale=k_scale, keys_major=keys_major,
                              pages=pages, shuffle_max=shuffle_max)
    keys_all = R.dequantize_fp8(codes, k_scale)
    for b, n in enumerate(lengths):
        keys = R.cached_rows(keys_all, table, b, n)[None]
        want = R._pool_blocks(R.index_token_scores(q_idx[b:b + 1].double(), keys, None, n - S), Bk)[0]
        magnitude = R._pool_blocks(R.index_token_scores(q_idx[b:b + 1].double().abs(), keys.abs(), None, n - S), Bk)[0]
        want = torch.nn.functional.pad(want, (0, max_pages - want.shape[-1]), value=float("-inf"))
        magnitude = torch.nn.functional.pad(magnitude, (0, max_pages - magnitude.shape[-1]), value=float("-inf"))
        row = got[b].permute(1, 0, 2).double()
        assert torch.equal(torch.isneginf(row), torch.isneginf(want)), f"row {b}: -inf entries differ"
        seen = torch.isfinite(want)
        assert ((row[seen] - want[seen]).abs() <= 2.0**-10 * magnitude[seen]).all(), f"row {b}"


@pytest.mark.parametrize("S,G,Bk,topk,local_blocks", [(1, 4, 128, 16, 1), (8, 4, 128, 16, 1), (5, 2, 64, 8, 2)])
def test_the_rescore_stage_ranks_the_candidates_by_their_exact_scores(S, G, Bk, topk, local_blocks, seed=0):
    """The second stage alone over shuffled pages: candidates laid out as the decode top-k leaves them (the forced
    blocks first, then some earlier blocks, -1 where a short row has none), ranked by the exact keys' scores: the
    forced slots unchanged, then the float64 reference's choice among the candidates in descending order of score,
    up to ties within bf16 rounding."""
    from msa_tl.decode.rescore import rescore_blocks

    q_idx, k_idx_pages, table, _, lengths = paged_index_keys(S, G, Bk, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    L, c = local_blocks, 2 * (topk - local_blocks)
    index_scale = q_idx.shape[-1] ** -0.5
    cand = torch.full((len(lengths), S, G, L + c), -1, dtype=torch.int32)
    exact = []
    for b, n in enumerate(lengths):
        keys = R.cached_rows(k_idx_pages, table, b, n)[None]
        exact.append(R._pool_blocks(R.index_token_scores(q_idx[b:b + 1], keys, index_scale, n - S), Bk)[0])
        for s in range(S):
            local = (n - S + s) // Bk
            for j in range(L):
                cand[b, s, :, j] = local - j if local >= j else -1
            earlier = local - L + 1
            for g in range(G):
                chosen = torch.randperm(max(earlier, 0), generator=gen)[:c]
                cand[b, s, g, L:L + chosen.numel()] = chosen.int()
    got = rescore_blocks(q_idx, k_idx_pages, table, cand.cuda(), topk, index_scale, L).cpu()
    for b, n in enumerate(lengths):
        for s in range(S):
            for g in range(G):
                assert torch.equal(got[b, s, g, :L], cand[b, s, g, :L]), (b, s, g)
                pool = [i for i in cand[b, s, g, L:].tolist() if i >= 0]
                score = exact[b][g, s].cpu()
                want = sorted(pool, key=lambda i: -score[i].item())[:topk - L]
                mine = got[b, s, g, L:].tolist()
                assert mine[len(want):] == [-1] * (topk - L - len(want)), (b, s, g)
                mine = mine[:len(want)]
                values = [score[i].item() for i in mine]
                assert all(values[i] >= values[i + 1] - 2**-8 * max(1.0, abs(values[i]))  # descending, up to ties
                           for i in range(len(values) - 1)), (b, s, g, values)
                for blk in set(mine) ^ set(want):  # a swap across the boundary: a tie within bf16 rounding
                    boundary = score[want[-1]].item()
                    assert abs(score[blk].item() - boundary) <= 2**-8 * max(1.0, abs(boundary)), (b, s, g, blk)


@pytest.mark.parametrize("S,G,Hq,D,Di,Bk,topk,contiguous", [(1, 4, 64, 128, 128, 128, 16, False),
                                                             (8, 2, 16, 64, 64, 64, 8, True)],
                         ids=["decode-paper-paged", "draft-8-Bk64-contiguous"])
def test_msa_decode_with_a_rescoring_fp8_cache_selects_as_the_exact_keys_do(S, G, Hq, D, Di, Bk, topk, contiguous,
                                                                           seed=0):
    """FP8 scan, FP8 top-k of 2 (k - 1) candidates, their rescoring with the exact keys and the attention, through
    msa_decode: the selection of the exact (bf16) keys up to bf16 ties, outputs and LSE against the float64
    reference over the kernel's selection."""
    lengths = [S + 5, 1500, 4 * Bk + 9, 6000 + S]
    cache, q, q_idx = decode_case(lengths, S, Hq, G, D, Di, Bk, seed, contiguous=contiguous, fp8=True, rescore=True)
    assert_decode_step_matches_the_reference(cache, q, q_idx, Bk, topk)


@pytest.mark.parametrize("max_pages,topk,local_blocks", [(24, 16, 1), (1024, 16, 1), (1024, 31, 1), (8192, 31, 1),
                                                          (8192, 16, 2), (700, 5, 1), (16384, 16, 1)])
@pytest.mark.parametrize("scores_kind", ["random", "ties", "nan-and-inf"])
def test_the_radix_top_k_chooses_exactly_what_the_lists_choose(max_pages, topk, local_blocks, scores_kind, seed=0):
    """decode_topk_radix_program against decode_topk_program on the same scores: the same Idx, bit for bit (slot
    order included), over rows of every length up to max_pages (fewer blocks than slots, a row of one block),
    ties of equal scores (few distinct values, -0 beside +0), NaN and -inf scores (never chosen) and +inf."""
    from msa_tl.decode.topk import decode_select

    gen = torch.Generator(device="cuda").manual_seed(seed)
    S, G, Bk = 2, 4, 128
    lengths = [S, 5 * Bk + 3, max_pages * Bk // 2 + 7, max_pages * Bk]
    scores = torch.randn(len(lengths), S, G, max_pages, device="cuda", generator=gen)
    if scores_kind == "ties":
        scores = (scores * 2).round() / 2  # ~13 distinct values: most of a row ties
        scores[..., ::7] = -0.0
    elif scores_kind == "nan-and-inf":
        pick = torch.rand(scores.shape, device="cuda", generator=gen)
        scores[pick < 0.05] = float("nan")
        scores[(pick >= 0.05) & (pick < 0.1)] = float("-inf")
        scores[(pick >= 0.1) & (pick < 0.102)] = float("inf")
    seqlens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    config = {} if local_blocks == 1 else dict(local_blocks=local_blocks)
    lists = decode_select(scores, seqlens, Bk, topk, **config)
    radix = decode_select(scores, seqlens, Bk, topk, radix=True, **config)
    assert (lists[:, :, :, local_blocks:] >= 0).any(), "no ranked slot chosen: the case tests nothing"
    assert torch.equal(radix, lists)
