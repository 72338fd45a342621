"""The MSA layer as a drop-in for the attention of real models: RoPE (full and partial), QK-norm, the index
branch's RoPE / norms, and ``from_dense`` on transformers' Llama, Qwen2, Qwen3, Mistral and MiniMax-M3 layers.

Transformers 5.24's Llama rotary embedding ignores ``partial_rotary_factor`` (its default RoPE rotates all of
head_dim, and its ``apply_rotary_pos_emb`` needs cos as wide as the head), so partial rotary comes from
MiniMax-M3's attention (``partial_rotary_factor`` 0.5: 16 of 32 dims), which rotates the first rot dims.
"""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (  # noqa: E402
    MiniMaxM3VLAttention,
    MiniMaxM3VLRMSNorm,
    MiniMaxM3VLRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRotaryEmbedding  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RMSNorm, Qwen3RotaryEmbedding  # noqa: E402

from msa_tl import MSAAttention, select_blocks  # noqa: E402
from msa_tl.ops.cache import MSACache  # noqa: E402
from msa_tl.ops.layer import RMSNorm  # noqa: E402

f64 = torch.float64
SEED = 1234
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 32
SMALL = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
             vocab_size=32, num_hidden_layers=1, intermediate_size=64)
M3_SMALL = dict(SMALL, mlp_layer_types=["dense"], bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})


def llama():
    return transformers.LlamaConfig(**SMALL), LlamaAttention, LlamaRotaryEmbedding


def qwen2():  # q / k / v biases
    return transformers.Qwen2Config(**SMALL), Qwen2Attention, Qwen2RotaryEmbedding


def qwen3():  # per-head q_norm / k_norm (scale by w)
    return transformers.Qwen3Config(**SMALL), Qwen3Attention, Qwen3RotaryEmbedding


def mistral():
    return transformers.MistralConfig(**SMALL, sliding_window=None), MistralAttention, MistralRotaryEmbedding


def minimax_m3():  # partial rotary (16 of 32 dims), Gemma-style q_norm / k_norm (scale by 1 + w)
    config = transformers.MiniMaxM3VLTextConfig(**M3_SMALL, layer_types=["full_attention"])
    return config, MiniMaxM3VLAttention, MiniMaxM3VLRotaryEmbedding


def minimax_m3_sparse(index_head_dim=32, local_blocks=1):  # and its block indexer: a head per KV group, Bk 16, top-3
    config = transformers.MiniMaxM3VLTextConfig(**M3_SMALL, layer_types=["minimax_m3_sparse"], index_n_heads=KV_HEADS,
                                                index_head_dim=index_head_dim, index_block_size=16,
                                                index_topk_blocks=3, index_local_blocks=local_blocks)
    return config, MiniMaxM3VLAttention, MiniMaxM3VLRotaryEmbedding


MODELS = [llama, qwen2, qwen3, mistral, minimax_m3]


def dense_layer(model, attn_implementation="sdpa", dtype=torch.float32, seed=SEED):
    """A transformers attention layer with random weights, norm weights and biases (a norm left at its init would
    be an identity a skipped norm also passes), and its model's rotary embedding."""
    config, attention_cls, rotary_cls = model()
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    dense = attention_cls(config, layer_idx=0)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(0.0, 0.5)
    return dense.to(dtype).eval(), rotary_cls(config)


def inputs(rotary, B=2, N=70, dtype=torch.float32, seed=SEED, positions=None):
    """Hidden states [B, N, HIDDEN] and the model's (cos, sin) for random positions (a fresh random set per row)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, HIDDEN, generator=gen).to(dtype)
    if positions is None:
        positions = torch.randint(0, 8192, (B, N), generator=gen)
    return x, rotary(x, positions)


def run_dense(dense, x, position_embeddings):
    """The transformers layer, causal with no padding: SDPA takes no mask (it then runs is_causal), eager the
    additive causal mask the model would build."""
    N = x.shape[1]
    mask = None
    if dense.config._attn_implementation == "eager":
        mask = torch.full((N, N), float("-inf"), dtype=x.dtype).triu(1)[None, None]
    with torch.no_grad():
        return dense(x, position_embeddings, attention_mask=mask)[0]


# --- RMSNorm ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, f64])
@pytest.mark.parametrize("theirs_cls,unit_offset", [(Qwen3RMSNorm, False), (MiniMaxM3VLRMSNorm, True)])
def test_rms_norm_rounds_as_transformers_does(theirs_cls, unit_offset, dtype):
    """Bit for bit, bf16 included, where Llama-style (cast, then * w) and Gemma-style ((x * (1 + w)), then cast)
    norms round differently."""
    gen = torch.Generator().manual_seed(SEED)
    theirs = theirs_cls(24, eps=1e-5)
    ours = RMSNorm(24, eps=1e-5, unit_offset=unit_offset)
    assert torch.equal(ours.weight, theirs.weight), "same init: 1, or 0 as an offset from 1"
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(24, generator=gen))
        ours.weight.copy_(theirs.weight)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = (3 * torch.randn(5, 7, 24, generator=gen)).to(dtype)
    assert torch.equal(ours(x), theirs(x))
    other_convention = RMSNorm(24, eps=1e-5, unit_offset=not unit_offset).to(dtype)
    with torch.no_grad():
        other_convention.weight.copy_(ours.weight)
    assert not torch.allclose(other_convention(x).double(), theirs(x).double(), atol=1e-2)


# --- warmup equals the dense layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_from_dense_warmup_equals_the_transformers_layer(model, attn_implementation):
    dense, rotary = dense_layer(model, attn_implementation)
    layer = MSAAttention.from_dense(dense, index_head_dim=32, block_size=16, topk=2)
    config = dense.config
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert layer.mode == "warmup" and layer.qk_norm == hasattr(dense, "q_norm")
    assert layer.rotary_dim == int(HEAD_DIM * config.rope_parameters.get("partial_rotary_factor", 1.0))
    x, position_embeddings = inputs(rotary)
    assert position_embeddings[0].shape[-1] == layer.rotary_dim
    expected = run_dense(dense, x, position_embeddings)
    with torch.no_grad():
        got = layer(x, position_embeddings, compute_kl=False).output
    if attn_implementation == "sdpa":  # the same ops in the same order: the same bits
        assert torch.equal(got, expected)
    else:  # eager's softmax is another rounding of the same float32 attention
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    layer.rotary_dim = None  # lets the layer run without positions, to show that they matter here
    with torch.no_grad():
        assert (layer(x, None, compute_kl=False).output - expected).abs().max() > 1e-3


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_from_dense_warmup_is_as_accurate_as_the_model_in_bf16(model):
    """bf16: the layer's error against the float64 dense layer is at most twice the bf16 dense layer's."""
    dense, rotary = dense_layer(model, "eager", dtype=torch.bfloat16)
    layer = MSAAttention.from_dense(dense, index_head_dim=32, block_size=16, topk=2)
    x, position_embeddings = inputs(rotary, dtype=torch.bfloat16)
    exact = run_dense(copy.deepcopy(dense).double(), x.double(), tuple(t.double() for t in position_embeddings))
    model_error = (run_dense(dense, x, position_embeddings).double() - exact).abs().max().item()
    with torch.no_grad():
        got = layer(x, position_embeddings, compute_kl=False).output
    assert got.dtype == torch.bfloat16
    assert (got.double() - exact).abs().max().item() <= 2 * model_error


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_full_budget_sparse_equals_the_transformers_layer(model):
    dense, rotary = dense_layer(model, dtype=f64)
    N, Bk = 70, 16
    layer = MSAAttention.from_dense(dense, index_head_dim=32, block_size=Bk, topk=math.ceil(N / Bk), mode="sparse")
    x, position_embeddings = inputs(rotary, N=N, dtype=f64)
    with torch.no_grad():
        got = layer(x, position_embeddings, compute_kl=False).output
    torch.testing.assert_close(got, run_dense(dense, x, position_embeddings), rtol=1e-7, atol=1e-7)


# --- MiniMax-M3's sparse layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("index_head_dim,local_blocks", [(16, 1), (32, 1), (32, 2)])  # rot = Di and rot < Di
def test_from_dense_of_minimax_m3_sparse_attention_is_that_layer(index_head_dim, local_blocks, attn_implementation):
    """M3's indexer (index q / k projections, Gemma-style norms, RoPE on the first rot index dims, its forced local
    blocks) is copied: the layer starts sparse, picks M3's blocks and gives its output."""
    dense, rotary = dense_layer(lambda: minimax_m3_sparse(index_head_dim, local_blocks), attn_implementation)
    layer = MSAAttention.from_dense(dense)
    assert layer.mode == "sparse" and (layer.block_size, layer.topk, layer.index_head_dim) == (16, 3, index_head_dim)
    assert layer.local_blocks == local_blocks
    assert layer.index_rope and layer.index_qk_norm and layer.index_q_norm.unit_offset and layer.q_norm.unit_offset
    N = 100
    x, position_embeddings = inputs(rotary, N=N, positions=torch.arange(N).expand(2, N))  # M3 blocks by position
    with torch.no_grad():
        expected = dense(x, position_embeddings, None, position_ids=torch.arange(N).expand(2, N))[0]
        m3_blocks = dense.indexer(x, position_embeddings, None, torch.arange(N).expand(2, N))  # [B, G, N, topk]
        out = layer(x, position_embeddings, compute_kl=False)
    assert torch.equal(out.indices.transpose(1, 2).sort(-1).values.long(), m3_blocks.sort(-1).values)
    torch.testing.assert_close(out.output, expected, rtol=1e-5, atol=1e-6)


def test_from_dense_rejects_an_indexer_it_cannot_express():
    dense, _ = dense_layer(minimax_m3_sparse)
    dense.indexer.local_blocks = 0
    with pytest.raises(ValueError, match="local_blocks"):
        MSAAttention.from_dense(dense)
    dense, _ = dense_layer(minimax_m3_sparse)
    with pytest.raises(ValueError, match="index_head_dim"):
        MSAAttention.from_dense(dense, index_head_dim=16)
    dense.indexer.q_proj = torch.nn.Linear(HIDDEN, 4 * 32, bias=False)
    dense.indexer.num_heads = 4
    with pytest.raises(ValueError, match="one per KV group"):
        MSAAttention.from_dense(dense)


# --- the layer's own RoPE and norms, against a formula written out here ----------------------------------------


def rope_by_pairs(x, cos, sin):
    """RoPE written pair by pair: dims (i, i + rot/2) of the first rot rotate by the angle whose cos / sin sit at
    column i (and again at i + rot/2) of [B, N, rot] cos / sin; the remaining dims pass through."""
    rot = cos.shape[-1]
    half = rot // 2
    c, s = cos[:, :, None, :half], sin[:, :, None, :half]
    first, second = x[..., :half], x[..., half:rot]
    return torch.cat((first * c - second * s, second * c + first * s, x[..., rot:]), dim=-1)


def rms(x, weight, eps, unit_offset):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * ((1 + weight) if unit_offset else weight)


def expected_output(layer, x, cos, sin):
    """The layer's warmup output from its weights: project, normalise, rotate, causal softmax attention."""
    B, N, _ = x.shape
    H, G, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = layer.q_proj(x).view(B, N, H, D), layer.k_proj(x).view(B, N, G, D), layer.v_proj(x).view(B, N, G, D)
    if layer.qk_norm:
        q = rms(q, layer.q_norm.weight, layer.q_norm.eps, layer.q_norm.unit_offset)
        k = rms(k, layer.k_norm.weight, layer.k_norm.eps, layer.k_norm.unit_offset)
    q, k = rope_by_pairs(q, cos, sin), rope_by_pairs(k, cos, sin)
    k, v = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
    scores = torch.einsum("bthd,bjhd->bhtj", q, k) * (layer.scale or 1 / math.sqrt(D))
    scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhtj,bjhd->bthd", scores.softmax(-1), v)
    return layer.o_proj(o.reshape(B, N, H * D))


def rope_tables(B, N, rot, gen, batch_shared=False):
    """(cos, sin) [B or 1, N, rot] in the rotate_half layout (each angle in columns i and i + rot/2)."""
    angles = 10 * torch.rand(1 if batch_shared else B, N, rot // 2, generator=gen, dtype=f64)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def randomize_norms(layer, gen):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("rot", [16, 12])
def test_layer_applies_qk_norm_then_partial_rope(rot, unit_offset):
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    layer = MSAAttention(HIDDEN, 4, 2, 16, 16, block_size=16, topk=2, mode="warmup", qk_norm=True,
                         norm_eps=1e-5, norm_unit_offset=unit_offset, dtype=f64).eval()
    randomize_norms(layer, gen)
    B, N = 2, 40
    x = torch.randn(B, N, HIDDEN, generator=gen, dtype=f64)
    cos, sin = rope_tables(B, N, rot, gen)
    with torch.no_grad():
        expected = expected_output(layer, x, cos, sin)
        torch.testing.assert_close(layer(x, (cos, sin)).output, expected, rtol=1e-6, atol=1e-7)  # norms in fp32
        layer.qk_norm = False  # the same weights with the norms skipped give something else
        assert (layer(x, (cos, sin)).output - expected).abs().max() > 1e-2


def test_position_embeddings_shared_by_the_batch_equal_per_row_ones():
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    layer = MSAAttention(HIDDEN, 4, 2, 16, 16, block_size=16, topk=2, mode="warmup", dtype=f64).eval()
    B, N = 3, 30
    x = torch.randn(B, N, HIDDEN, generator=gen, dtype=f64)
    cos, sin = rope_tables(B, N, 16, gen, batch_shared=True)
    with torch.no_grad():
        per_row = layer(x, (cos.expand(B, -1, -1), sin.expand(B, -1, -1))).output
        torch.testing.assert_close(layer(x, (cos, sin)).output, per_row, rtol=0, atol=0)
        torch.testing.assert_close(layer(x, (cos[0], sin[0])).output, per_row, rtol=0, atol=0)
        torch.testing.assert_close(per_row, expected_output(layer, x, cos.expand(B, -1, -1), sin.expand(B, -1, -1)))


@pytest.mark.parametrize("index_qk_norm", [False, True])
def test_index_rope_rotates_what_the_index_branch_selects_over(index_qk_norm):
    """With index_rope the selection is select_blocks over normalised, rotated index q / k (the first rot of Di
    dims); without it, over the unrotated ones, and the two selections differ."""
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    B, N, G, Di, rot, Bk, topk = 2, 160, 2, 32, 16, 16, 2
    layer = MSAAttention(HIDDEN, 4, G, 16, Di, block_size=Bk, topk=topk, index_rope=True, index_qk_norm=index_qk_norm,
                         norm_unit_offset=True, dtype=f64).eval()
    randomize_norms(layer, gen)
    x = torch.randn(B, N, HIDDEN, generator=gen, dtype=f64)
    cos, sin = rope_tables(B, N, rot, gen)
    with torch.no_grad():
        q_idx, k_idx = layer.index_q_proj(x).view(B, N, G, Di), layer.index_k_proj(x)
        if index_qk_norm:
            q_idx = rms(q_idx, layer.index_q_norm.weight, layer.index_q_norm.eps, True)
            k_idx = rms(k_idx, layer.index_k_norm.weight, layer.index_k_norm.eps, True)
        rotated = select_blocks(rope_by_pairs(q_idx, cos, sin), rope_by_pairs(k_idx[:, :, None], cos, sin)[:, :, 0],
                                block_size=Bk, topk=topk)
        unrotated = select_blocks(q_idx, k_idx, block_size=Bk, topk=topk)
        with_rope = layer(x, (cos, sin)).indices
        layer.index_rope = False
        without_rope = layer(x, (cos, sin)).indices
    same = lambda a, b: torch.equal(a.sort(-1).values, b.sort(-1).values)  # noqa: E731 (slot order is free)
    assert same(with_rope, rotated) and same(without_rope, unrotated)
    assert not same(rotated, unrotated), "the rotation must change the selection for this test to see it"


# --- gradients -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_index_norms_learn_from_the_kl_loss_alone_and_the_qk_norms_from_the_lm_loss(mode):
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    layer = MSAAttention(HIDDEN, 4, 2, 16, 16, block_size=16, topk=2, mode=mode, qk_norm=True, index_qk_norm=True,
                         index_rope=True, dtype=f64).train()
    randomize_norms(layer, gen)
    index_ids = set(map(id, layer.index_parameters()))
    assert {id(p) for name, p in layer.named_parameters() if name.startswith("index_")} == index_ids
    x = torch.randn(2, 50, HIDDEN, generator=gen, dtype=f64, requires_grad=True)
    cos, sin = rope_tables(2, 50, 16, gen)
    out = layer(x, (cos, sin))
    lm_grads = torch.autograd.grad(out.output.square().mean(), [x, *layer.parameters()], allow_unused=True,
                                   retain_graph=True)
    x_grad_from_kl, *kl_grads = torch.autograd.grad(out.kl_loss, [x, *layer.parameters()], allow_unused=True)
    assert lm_grads[0].abs().sum() > 0 and x_grad_from_kl is None, "the KL stops at the index branch's input"
    for (name, p), lm, kl in zip(layer.named_parameters(), lm_grads[1:], kl_grads):
        learns, silent = (kl, lm) if id(p) in index_ids else (lm, kl)
        assert learns is not None and learns.abs().sum() > 0, name
        assert silent is None or torch.count_nonzero(silent) == 0, name


# --- generation with a cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_cached_generation_with_rope_gives_the_full_forward_rows(mode):
    """Prefill, single tokens and a chunk, each with the (cos, sin) of its own positions: every row equals the
    full-sequence forward's (RoPE, partial, on q / k and the index q / k; QK-norms; a non-default scale)."""
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    B, N, G, D, Di, Bk, topk = 2, 150, 2, 32, 32, 16, 3
    layer = MSAAttention(HIDDEN, 4, G, D, Di, block_size=Bk, topk=topk, mode=mode, scale=0.3, rotary_dim=16,
                         qk_norm=True, index_qk_norm=True, index_rope=True, norm_unit_offset=True, dtype=f64).eval()
    randomize_norms(layer, gen)
    x = torch.randn(B, N, HIDDEN, generator=gen, dtype=f64)
    cos, sin = rope_tables(B, N, 16, gen)
    with torch.no_grad():
        full = layer(x, (cos, sin))
        cache = MSACache.paged(B, N, G, D, Di, page_size=Bk, dtype=f64)
        t = 0
        for S in [100, 1, 1, 5, 1]:
            out = layer(x[:, t:t + S], (cos[:, t:t + S], sin[:, t:t + S]), cache=cache)
            assert (out.output - full.output[:, t:t + S]).abs().max().item() <= 1e-10, (mode, t, S)
            if mode == "sparse":
                assert torch.equal(out.indices.sort(-1).values, full.indices[:, t:t + S].sort(-1).values)
            t += S
        assert cache.lengths == [t] * B
        # the newest tokens rotated at other positions are other rows: the cache path does use the positions
        cache = MSACache.paged(B, N, G, D, Di, page_size=Bk, dtype=f64)
        layer(x[:, :t - 1], (cos[:, :t - 1], sin[:, :t - 1]), cache=cache)
        wrong = layer(x[:, t - 1:t], (cos[:, :1], sin[:, :1]), cache=cache).output
        assert (wrong - full.output[:, t - 1:t]).abs().max() > 1e-3


# --- from_dense: what it infers and keeps ----------------------------------------------------------------------


def test_from_dense_keeps_a_non_default_softmax_scale():
    dense, rotary = dense_layer(llama, dtype=f64)
    dense.scaling = 0.37  # as Gemma's query_pre_attn_scalar gives
    layer = MSAAttention.from_dense(dense, index_head_dim=32, block_size=16, topk=5)
    assert layer.scale == 0.37 and "scale=0.37" in repr(layer)
    x, position_embeddings = inputs(rotary, N=70, dtype=f64)
    expected = run_dense(dense, x, position_embeddings)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, position_embeddings).output, expected, rtol=1e-12, atol=1e-12)
        layer.set_mode("sparse")
        torch.testing.assert_close(layer(x, position_embeddings).output, expected, rtol=1e-7, atol=1e-7)
    assert MSAAttention.from_dense(dense_layer(llama)[0]).scale is None


def test_explicit_head_counts_still_work_and_are_checked_against_the_module():
    dense, _ = dense_layer(qwen2)
    layer = MSAAttention.from_dense(dense, num_heads=HEADS, num_kv_heads=KV_HEADS)
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert all(getattr(layer, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    with pytest.raises(ValueError, match="num_heads"):
        MSAAttention.from_dense(dense, num_heads=HEADS * 2)
    with pytest.raises(ValueError, match="k_proj"):
        MSAAttention.from_dense(dense, num_kv_heads=1)


def test_from_dense_reads_head_counts_from_module_attributes_without_a_config():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.num_key_value_heads = 4, 2  # head_dim left to infer: 96 / 4
            self.q_proj, self.o_proj = torch.nn.Linear(48, 96), torch.nn.Linear(96, 48)
            self.k_proj, self.v_proj = torch.nn.Linear(48, 48), torch.nn.Linear(48, 48)

    layer = MSAAttention.from_dense(Attention())
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.rotary_dim) == (4, 2, 24, None)
    with pytest.raises(ValueError, match="num_kv_heads"):
        bare = Attention()
        del bare.num_key_value_heads
        MSAAttention.from_dense(bare)


def test_a_layer_from_a_rope_model_requires_position_embeddings():
    dense, rotary = dense_layer(qwen3)
    layer = MSAAttention.from_dense(dense)
    x, (cos, sin) = inputs(rotary)
    with pytest.raises(ValueError, match="position_embeddings are required"):
        layer(x)
    with pytest.raises(ValueError, match="rotary_dim"):
        layer(x, (cos[..., :16], sin[..., :16]))


def test_from_dense_copies_norm_eps_and_refuses_a_lone_norm():
    dense, _ = dense_layer(qwen3)
    dense.q_norm.variance_epsilon = dense.k_norm.variance_epsilon = 1e-3
    layer = MSAAttention.from_dense(dense)
    assert layer.q_norm.eps == layer.k_norm.eps == 1e-3 and not layer.q_norm.unit_offset
    assert torch.equal(layer.k_norm.weight, dense.k_norm.weight)
    assert layer.k_norm.weight.data_ptr() != dense.k_norm.weight.data_ptr(), "a copy, not shared storage"
    del dense.k_norm
    with pytest.raises(ValueError, match="q_norm / k_norm"):
        MSAAttention.from_dense(dense)


# --- bad arguments ---------------------------------------------------------------------------------------------


def _bad_position_embeddings(B, N, D):
    good = torch.zeros(B, N, D, dtype=f64)
    return {
        "not a pair": good,
        "three tensors": (good, good, good),
        "not tensors": (1.0, 2.0),
        "cos and sin differ": (good, good[..., :D - 2]),
        "wrong seq": (good[:, :-1], good[:, :-1]),
        "wrong batch": (torch.zeros(B + 1, N, D, dtype=f64),) * 2,
        "4-d": (good[:, :, None], good[:, :, None]),
        "odd rot": (good[..., :D - 1], good[..., :D - 1]),
        "wider than the head": (torch.zeros(B, N, D + 2, dtype=f64),) * 2,
        "integer": (torch.zeros(B, N, D, dtype=torch.int64),) * 2,
    }


@pytest.mark.parametrize("case", list(_bad_position_embeddings(2, 20, 16)))
def test_bad_position_embeddings_are_rejected(case):
    layer = MSAAttention(HIDDEN, 4, 2, 16, 16, block_size=16, topk=2, mode="warmup", dtype=f64)
    with pytest.raises(ValueError, match="position_embeddings"):
        layer(torch.zeros(2, 20, HIDDEN, dtype=f64), _bad_position_embeddings(2, 20, 16)[case])


def test_index_rope_needs_rot_within_the_index_head():
    layer = MSAAttention(HIDDEN, 4, 2, 32, 16, block_size=16, topk=2, index_rope=True, dtype=f64)
    rope = (torch.zeros(2, 20, 32, dtype=f64),) * 2
    with pytest.raises(ValueError, match="index_head_dim"):
        layer(torch.zeros(2, 20, HIDDEN, dtype=f64), rope)
    layer.index_rope = False
    assert layer(torch.zeros(2, 20, HIDDEN, dtype=f64), rope).output.shape == (2, 20, HIDDEN)
    with pytest.raises(ValueError, match="index_head_dim"):
        MSAAttention(HIDDEN, 4, 2, 32, 16, rotary_dim=32, index_rope=True)


@pytest.mark.parametrize("kw,match", [(dict(rotary_dim=7), "rotary_dim"), (dict(rotary_dim=48), "rotary_dim"),
                                      (dict(scale=-1.0), "scale"), (dict(norm_eps=-1e-6), "norm_eps")])
def test_bad_options_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        MSAAttention(HIDDEN, 4, 2, 32, 16, **kw)


def test_extra_repr_lists_the_options():
    text = repr(MSAAttention(HIDDEN, 4, 2, 32, 16, rotary_dim=16, index_rope=True, qk_norm=True, index_qk_norm=True,
                             norm_unit_offset=True))
    for option in ("rotary_dim=16", "index_rope=True", "qk_norm=True", "index_qk_norm=True", "scale=None",
                   "unit_offset=True"):
        assert option in text


# --- MiniMax-M3's sparse layer on the GPU kernels -------------------------------------------------------------


@pytest.mark.gpu
def test_minimax_m3_sparse_layer_on_the_kernels_matches_transformers():
    """At a kernel shape (D = Di = 128, Bk = 128, G = 4, 4 heads a group, partial rotary 64 of 128), bf16 on the GPU:
    the layer from ``from_dense`` picks transformers' blocks (its indexer, fp32 scores over the same bf16
    projections) except near ties, and on the rows where the two agree its output is within FA3's calibration of
    transformers' own bf16 output, both against the layer computed in float32."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    shape = dict(hidden_size=512, num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=32,
                 num_hidden_layers=1, intermediate_size=64, mlp_layer_types=["dense"], bos_token_id=None,
                 eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                     "partial_rotary_factor": 0.5})
    config = transformers.MiniMaxM3VLTextConfig(**shape, layer_types=["minimax_m3_sparse"], index_n_heads=4,
                                                index_head_dim=128, index_block_size=128, index_topk_blocks=4,
                                                index_local_blocks=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    dense32 = MiniMaxM3VLAttention(config, layer_idx=0).cuda().eval()
    with torch.no_grad():
        for name, p in dense32.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    dense16 = copy.deepcopy(dense32).bfloat16()
    layer = MSAAttention.from_dense(dense16)
    rotary = MiniMaxM3VLRotaryEmbedding(config).cuda()
    N = 2048
    positions = torch.arange(N, device="cuda")[None]
    x16 = torch.randn(1, N, 512, device="cuda").bfloat16()
    x32 = x16.float()
    with torch.no_grad():
        out = layer(x16, rotary(x16, positions), compute_kl=False)
        theirs16 = dense16(x16, rotary(x16, positions), None, position_ids=positions)[0]
        ref = dense32(x32, rotary(x32, positions), None, position_ids=positions)[0]
        their_blocks = dense16.indexer(x16, rotary(x16, positions), None, positions)  # [1, G, N, topk]
    ours = out.indices.transpose(1, 2).long().sort(-1).values
    same = (ours == their_blocks.sort(-1).values).all(-1).all(1)[0]  # [N] rows whose every group agrees
    assert same.float().mean() >= 0.98, f"{(~same).sum()} of {N} rows chose other blocks"
    err_ours = (out.output[0, same].float() - ref[0, same]).norm() / ref[0, same].norm()
    err_theirs = (theirs16[0, same].float() - ref[0, same]).norm() / ref[0, same].norm()
    assert err_ours <= 2 * err_theirs + 1e-3, f"ours {err_ours:.2e}, transformers bf16 {err_theirs:.2e}"
