"""Search spaces: the shipped defaults are feasible, impossible configs are rejected before compiling."""

import pytest

from msa_tl.attention import backward as kv_outer_backward
from msa_tl.attention import combine as lse_combine
from msa_tl.attention import kv_outer as kv_outer_attention
from msa_tl.attention import q_outer as q_outer_attention
from msa_tl.index import scores as index_scores
from msa_tl.index import select as index_topk
from msa_tl.tuning.spaces import SMEM_LIMIT, SPACES

PAPER = dict(groups=4, heads=64, head_dim=128, index_dim=128, block_size=128, topk=16, seq=131072, batch=1, queries=1)


@pytest.mark.parametrize("program,defaults", [
    ("index_block_scores", index_scores.DEFAULTS),
    ("index_select_pipelined", index_topk.PIPELINED_DEFAULTS),
    ("index_select_fused", index_topk.FUSED_DEFAULTS),
    ("index_topk", index_topk.TOPK_DEFAULTS),
    ("kv_outer_attention", {k: v for k, v in kv_outer_attention.ATTENTION_DEFAULTS.items()}),
    ("lse_combine", lse_combine.COMBINE_DEFAULTS),
    ("q_outer_attention", q_outer_attention.Q_OUTER_DEFAULTS),
    ("kv_outer_backward", kv_outer_backward.BACKWARD_DEFAULTS),
    ("schedule", kv_outer_attention.SCHEDULE_TUNABLES),
])
def test_defaults_are_in_their_space_and_feasible(program, defaults):
    space = SPACES[program]
    assert space.dims, "the space keys the cache on its program's dims"
    assert set(defaults) == set(space.params), "every tunable of the kernel is searched, and only those"
    assert all(defaults[k] in space.params[k] for k in defaults)
    assert space.reject(defaults, PAPER) is None


@pytest.mark.parametrize("program,config,reason", [
    ("index_select_fused", dict(block_M=256, num_stages=4, threads=256, heavy_first=True), None),  # 197 KB fits
    ("index_select_fused", dict(block_M=256, num_stages=1, threads=128, heavy_first=True), "registers"),
    ("index_select_fused", dict(block_M=128, num_stages=2, threads=128, heavy_first=True), None),
    ("index_block_scores", dict(block_M=256, num_stages=2, threads=256, heavy_first=False), None),
    ("index_select_pipelined", dict(stages=4, heavy_first=True), None),  # 2 x 32 KB of Q + 4 x 32 KB of K
    ("kv_outer_attention", dict(stages=4, tma_stores=False, pingpong=False), "shared memory"),  # 4 x 2 ring slots of 16 KB beside K/V
    ("kv_outer_attention", dict(stages=3, tma_stores=False, pingpong=True), None),
    ("kv_outer_attention", dict(stages=3, tma_stores=True, pingpong=False), "shared memory"),  # 240 KB
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True), None),
    ("kv_outer_attention", dict(stages=2, tma_stores=False, pingpong=True, store_eviction="evict_first"), "TMA stores"),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, persistent=True), None),  # 227 KB exactly
    ("kv_outer_attention", dict(stages=2, tma_stores=False, pingpong=True, persistent=True), "shared memory"),
    ("kv_outer_backward", dict(kv_outer_backward.BACKWARD_DEFAULTS, stages=4), "shared memory"),
    ("kv_outer_backward", dict(kv_outer_backward.BACKWARD_DEFAULTS, stages=3), None),
    ("kv_outer_backward", dict(kv_outer_backward.BACKWARD_DEFAULTS, stages=3, item_queries=4096), None),
    # query_chunk sizes the dQ partials only: with atomic dQ one point, not four
    ("kv_outer_backward", dict(kv_outer_backward.BACKWARD_DEFAULTS, dq_partials=False, query_chunk=4096), "atomic"),
    ("kv_outer_backward", dict(kv_outer_backward.BACKWARD_DEFAULTS, query_chunk=32768), None),  # 8 GiB partials
    ("schedule", dict(item_queries=256, query_chunk=65536), "GiB"),  # 17 GiB of partials
    ("schedule", dict(item_queries=256, query_chunk=4096, persistent_combine=True, combine_ctas=32), None),
    ("schedule", dict(item_queries=256, query_chunk=4096, persistent_combine=False, combine_ctas=32), "persistent"),
    ("schedule", dict(item_queries=256, query_chunk=4096, persistent_combine=True, accumulate=True, combine_ctas=32),
     "partials path"),
    ("schedule", dict(item_queries=256, query_chunk=32768, persistent_combine=True, combine_ctas=32), "double"),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, tma_gathers=True, store_warp=True), None),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, tma_gathers=False, store_warp=True),
     "store warp"),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, persistent=True, tma_gathers=True,
                                store_warp=True), None),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, tma_gathers=True, store_warp=True,
                                combine_warps=True, combine_stages=6), None),  # 220 KB with the combine's ring
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, tma_gathers=True, combine_warps=True),
     "combine warps"),  # no store warp
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, persistent=True, tma_gathers=True,
                                store_warp=True, combine_warps=True), "combine warps"),
    ("kv_outer_attention", dict(stages=3, tma_stores=True, pingpong=True, tma_gathers=True, o_buffers=1,
                                store_warp=True, combine_warps=True), None),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, tma_gathers=True, o_buffers=1,
                                store_warp=True, combine_warps=True, combine_stages=14), None),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, tma_gathers=True, store_warp=True,
                                combine_warps=True, combine_stages=14), "shared memory"),
    ("kv_outer_attention", dict(stages=4, tma_stores=True, pingpong=True, tma_gathers=True, o_buffers=1,
                                store_warp=True, combine_warps=True), "shared memory"),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, tma_gathers=True, store_warp=True,
                                combine_prefetch=8), "change nothing"),
    ("kv_outer_attention", dict(stages=2, tma_stores=True, pingpong=True, tma_gathers=True, store_warp=True,
                                combine_warps=True, combine_prefetch=16), None),
])
def test_constraints(program, config, reason):
    got = SPACES[program].reject(config, PAPER)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_layout_constraints_depend_on_the_shape():
    one_group = dict(PAPER, groups=1, block_size=64)  # 64 tokens per key block, one row per token
    assert "key block" in SPACES["index_select_fused"].reject(
        dict(block_M=128, num_stages=2, threads=128, heavy_first=True), one_group)
    six_heads = dict(PAPER, heads=24, groups=4)  # 6 heads per group do not tile a consumer's 64 rows
    assert "heads" in SPACES["kv_outer_attention"].reject(dict(stages=2), six_heads)
    assert "GiB" in SPACES["schedule"].reject(dict(item_queries=256, query_chunk=32768), dict(PAPER, heads=128))
    assert "rows" in SPACES["index_select_pipelined"].reject(dict(stages=2, heavy_first=True), one_group)
    wide = dict(PAPER, index_dim=256)  # a wider index head needs more shared memory per stage
    assert "shared memory" in SPACES["index_block_scores"].reject(
        dict(block_M=256, num_stages=4, threads=256, heavy_first=False), wide)


def test_feasible_grids_are_nonempty_and_within_smem():
    for name, space in SPACES.items():
        feasible, grid = space.feasible(PAPER), list(space.grid())
        assert feasible, name
        assert all(c in grid and space.reject(c, PAPER) is None for c in feasible), name
        assert all(space.reject(c, PAPER) for c in grid if c not in feasible), name  # the rest, each with a reason
    assert all(2 * (c["block_M"] * 128 + c["num_stages"] * 128 * 128) <= SMEM_LIMIT
               for c in SPACES["index_block_scores"].feasible(PAPER))


def test_the_spaces_read_the_knob_grids_declared_beside_the_kernels():
    """One copy of each knob grid: the kernel module's, which the tuner's space is."""
    assert SPACES["kv_outer_attention"].params is kv_outer_attention.ATTENTION_KNOBS
    assert SPACES["schedule"].params is kv_outer_attention.SCHEDULE_KNOBS
    assert SPACES["index_select_pipelined"].params is index_topk.PIPELINED_KNOBS
    assert SPACES["lse_combine"].params is lse_combine.COMBINE_KNOBS
    assert SPACES["kv_outer_backward"].params is kv_outer_backward.BACKWARD_KNOBS


def test_every_program_is_described_once_beside_its_kernel():
    """The tuner's space, cache key, defaults and compile units of a program are its kernel module's TunableProgram."""
    from msa_tl.tuning import cache, objective
    from msa_tl.tuning.programs import PROGRAMS, tunable

    assert objective.PROGRAMS == PROGRAMS and set(SPACES) == set(PROGRAMS)
    assert tunable("kv_outer_attention") is kv_outer_attention.ATTENTION_TUNING
    for name in PROGRAMS:
        program = tunable(name)
        assert program.name == name
        assert SPACES[name].params is program.knobs and SPACES[name].reject is program.reject
        assert cache.PROGRAM_DIMS[name] == SPACES[name].dims == program.dims
        assert objective.defaults(name, PAPER) == program.default_config(PAPER)
        assert objective.compile_units(name, PAPER, objective.defaults(name, PAPER))


def test_the_program_names_load_no_kernel():
    """``msa-tl``'s argument parser reads the program names without importing TileLang or the kernels."""
    import subprocess
    import sys

    code = "import sys; from msa_tl.tuning.objective import PROGRAMS; assert 'tilelang' not in sys.modules, PROGRAMS"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("program", ["decode_scan", "decode_scan_fp8", "decode_topk", "decode_attention"])
@pytest.mark.parametrize("batch,queries,seq", [(1, 1, 1 << 20), (32, 1, 131072), (8, 8, 131072)])
def test_decode_programs_default_to_what_the_plan_picks_and_key_on_batch_and_queries(program, batch, queries, seq):
    """The decode kernels' defaults are in their spaces and feasible at every batch / queries / context; the scan's
    are :func:`scan_tiling`'s on 132 SMs and the top-k's warps :func:`topk_warps`' of the row; batch and queries are
    part of the cache key, so a batch-32 winner does not serve batch 1."""
    from msa_tl.decode import scores as decode_scores
    from msa_tl.decode import topk as decode_topk
    from msa_tl.tuning.cache import shape_key
    from msa_tl.tuning.programs import tunable

    shape = dict(PAPER, seq=seq, batch=batch, queries=queries)
    described = tunable(program)
    defaults = described.default_config(shape)
    space = SPACES[program]
    assert set(defaults) == set(space.params) and all(defaults[k] in space.params[k] for k in defaults)
    assert space.reject(defaults, shape) is None
    if program.startswith("decode_scan"):
        tiling = decode_scores.scan_tiling(queries * 4, batch, seq // 128, 132, decode_scores.DECODE_SCORES_DEFAULTS)
        assert all(defaults[k] == tiling[k] for k in ("blocks_per_cta", "num_stages", "keys_major"))
    if program == "decode_topk":
        assert defaults["warps"] == decode_topk.topk_warps(seq // 128) and defaults["radix"] is False
    if program == "decode_attention":  # draft tokens attend the union of their blocks; 4 a CTA at 32 CTAs of 8
        assert defaults["union"] == (queries > 1)
        assert defaults["tokens"] == (4 if queries > 1 and batch * 4 < 132 else 8)
    key = shape_key(program, shape)
    assert f"batch={batch}" in key and f"queries={queries}" in key
    assert key != shape_key(program, dict(shape, batch=batch + 1))


def test_decode_constraints():
    fp8 = SPACES["decode_scan_fp8"]
    assert "keys_major" in fp8.reject(dict(blocks_per_cta=32, num_stages=3, keys_major=False, pages=2), PAPER)
    assert fp8.reject(dict(blocks_per_cta=32, num_stages=4, keys_major=True, pages=2), PAPER) is None
    from msa_tl.tuning.objective import defaults

    topk = SPACES["decode_topk"]
    radix = dict(defaults("decode_topk", PAPER), radix=True)
    assert topk.reject(radix, PAPER) is None
    assert "one point" in topk.reject(dict(radix, unroll=16), PAPER)  # the same kernel as the default radix point
    assert len(SPACES["decode_topk"].feasible(PAPER)) == 13  # 12 lists configs and the radix select


def test_the_decode_attentions_pipelined_build_is_not_searched():
    """TileLang warns, lowering the pipelined decode attention, that a barrier it hoisted leaves a shared-memory race;
    the tuner rejects that build (it is kept as a knob to measure by hand) and searches the rest."""
    space = SPACES["decode_attention"]
    per_pair = dict(num_stages=2, pipelined=True, ctas_per_sm=2, union=False, tokens=8)
    assert "race" in space.reject(per_pair, PAPER)
    assert [c for c in space.feasible(PAPER) if c["pipelined"]] == []


def test_the_decode_attention_searches_the_union_only_where_a_row_has_several_tokens():
    """With one token a row there is no union to share: the space is the per-pair kernel's 9 points. With eight
    draft tokens (paper shape, R = 16) the union comes in at 4 and 8 tokens a CTA, at the ring depths whose shared
    memory fits and no more CTAs an SM than fit; ``tokens`` never varies without the union, of two token
    counts that both take the whole row only the smaller is searched, and 16 tokens of 16 heads (256 rows) are
    named as too many."""
    from msa_tl.decode.union import union_ctas_per_sm, union_limit

    space = SPACES["decode_attention"]
    one = space.feasible(dict(PAPER, batch=8, queries=1))
    assert len(one) == 9 and not any(c["union"] or c["tokens"] != 8 for c in one)
    drafts = dict(PAPER, batch=8, queries=8)
    unions = [c for c in space.feasible(drafts) if c["union"]]
    assert {c["tokens"] for c in unions} == {4, 8} and {c["num_stages"] for c in unions} == {1, 2}
    for c in unions:
        assert union_limit(c["tokens"], 16, 128, 128, 16, c["num_stages"]) is None
        assert c["ctas_per_sm"] <= union_ctas_per_sm(c["tokens"], 128, 128, 16, c["num_stages"])
    assert "as tokens=8 does" in space.reject(dict(unions[0], tokens=16), drafts)
    assert "128-row" in space.reject(dict(unions[0], tokens=16), dict(drafts, queries=16))  # 16 x 16 rows
    assert "as tokens=4 does" in space.reject(dict(unions[0], tokens=8), dict(drafts, queries=3))
    skips = [c for c in unions if c["skip_idle"]]  # two consumers only (8 tokens of 16 heads)
    assert skips and {c["tokens"] for c in skips} == {8}
    assert "union's" in space.reject(dict(one[0], skip_idle=True), dict(drafts, queries=1))


def test_the_decode_attention_defaults_to_the_union_for_draft_tokens_where_it_fits():
    """Per pair at one token a row; the union at several, 8 tokens a CTA where 8-token CTAs fill 132 SMs and 4 where
    they would not; per pair again where no union tile holds a chunk's rows (64 heads a group at D = 128: even 4
    tokens are 256 rows) or the head dim is past the union kernel's."""
    from msa_tl.decode.attention import attention_defaults

    shape = dict(PAPER, batch=8, queries=8)
    assert not attention_defaults(dict(shape, queries=1))["union"]
    assert attention_defaults(shape)["union"] and attention_defaults(shape)["tokens"] == 4  # 32 CTAs of 8 tokens
    assert attention_defaults(dict(shape, batch=64))["tokens"] == 8  # 256 CTAs
    assert attention_defaults(dict(shape, batch=64), sms=512)["tokens"] == 4
    assert attention_defaults(dict(shape, queries=2))["union"]
    assert not attention_defaults(dict(shape, heads=256))["union"]  # R = 64
    assert not attention_defaults(dict(shape, head_dim=256))["union"]
