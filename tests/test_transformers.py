"""msa_tl.integrations.transformers against transformers' own models, on CPU through the float64 reference.

MiniMax-M3: the converted sparse layers equal transformers' eager path (block mask over the indexer's selection),
prefill and cached decode equal the full forward, and generate equals transformers' generate. Llama / Qwen2 /
Qwen3 / Mistral: the converted model equals the original in warmup mode, sparse mode is MSA, the KL loss trains
only the index projections, checkpoints round-trip and generate runs on the MSA cache.

The models are tiny (hidden 64, 70-token prompts, blocks of 16 so that top-2 / top-3 of 5 blocks is a real
selection) with a large init range and random norm weights and biases (a norm left at its init would be an
identity a skipped norm also passes), so that logits and greedy tokens are well separated.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (  # noqa: E402
    MiniMaxM3VLAttention,
    MiniMaxM3VLRotaryEmbedding,
)

from msa_tl.integrations.transformers import (  # noqa: E402
    MiniMaxM3MSAAttention,
    MSACacheLayer,
    convert_to_msa,
    kl_losses,
    load_msa_model,
    msa_cache,
    msa_model_class,
    set_msa_mode,
    use_msa_kernels,
)

B, S, NEW = 2, 70, 8  # 70 tokens: 4 full blocks of 16 and a partial one
TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=64, num_hidden_layers=2, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
ATOL = 1e-4  # float32 logits of magnitude ~10


def m3_config(layer_types=("full_attention", "minimax_m3_sparse"), **overrides):
    """A 2-layer MiniMax-M3 text config: a full and a sparse attention layer, dense MLPs, RoPE on 16 of 32 dims."""
    options = dict(TINY, num_attention_heads=8, head_dim=32, index_n_heads=2, index_head_dim=32, index_block_size=16,
                   index_topk_blocks=2, index_local_blocks=1, layer_types=list(layer_types),
                   mlp_layer_types=["dense"] * len(layer_types), num_hidden_layers=len(layer_types),
                   dense_intermediate_size=64, shared_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                   rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})
    config = transformers.MiniMaxM3VLTextConfig(**{**options, **overrides})
    config._attn_implementation = "eager"
    return config


def perturb(module):
    """Random norm weights and biases (Gemma norms start at 0, Llama norms at 1, biases at 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(0.0, 0.5)
    return module.eval()


def m3_model(**overrides):
    return perturb(transformers.MiniMaxM3VLForCausalLM(m3_config(**overrides)))


def token_ids(length=S):
    return torch.randint(0, TINY["vocab_size"], (B, length))


def close(a, b, atol=ATOL):
    return torch.allclose(a, b, rtol=0, atol=atol), (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------- MiniMax-M3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("local_blocks", [1, 2])
def test_m3_sparse_layer_equals_transformers_eager(local_blocks, dtype):
    config = m3_config(layer_types=["minimax_m3_sparse"], index_topk_blocks=3, index_local_blocks=local_blocks)
    attn = perturb(MiniMaxM3VLAttention(config, layer_idx=0)).to(dtype)
    x = torch.randn(B, S, config.hidden_size, dtype=dtype)
    positions = torch.arange(S)[None].expand(B, -1)
    cos, sin = MiniMaxM3VLRotaryEmbedding(config)(x, positions)
    with torch.no_grad():
        expected = attn(x, (cos, sin), None, position_ids=positions)[0]
        attn.indexer.topk_blocks = 64
        dense = attn(x, (cos, sin), None, position_ids=positions)[0]
        attn.indexer.topk_blocks = 3
        assert use_msa_kernels(attn) is attn and type(attn) is MiniMaxM3MSAAttention
        got, weights = attn(x, (cos, sin), None, position_ids=positions)
    assert weights is None
    ok, err = close(got, expected, atol=1e-5)
    assert ok, err
    assert not torch.allclose(dense, expected, atol=1e-2), "top-3 of 5 blocks must drop keys"


def test_m3_model_logits_and_checkpoint_survive_conversion(tmp_path):
    model = m3_model()
    ids = token_ids()
    names = [name for name, _ in model.named_parameters()]
    with torch.no_grad():
        expected = model(ids).logits
        use_msa_kernels(model)
        model.set_attn_implementation("sdpa")  # the dense layer's mask and the padding check then see no mask
        got = model(ids).logits
    assert [name for name, _ in model.named_parameters()] == names
    assert [type(layer.self_attn) for layer in model.model.layers] == [MiniMaxM3VLAttention, MiniMaxM3MSAAttention]
    ok, err = close(got, expected)
    assert ok, err

    model.save_pretrained(tmp_path)
    loaded, info = transformers.MiniMaxM3VLForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                        attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, expected)


def test_m3_prefill_then_decode_equals_the_full_forward():
    model = use_msa_kernels(m3_model())
    ids = token_ids()
    prompt = 37  # decode crosses block boundaries 48 and 64, with 5 blocks for top-2
    cache = msa_cache(model, B, S)
    assert isinstance(cache.layers[1], MSACacheLayer) and not isinstance(cache.layers[0], MSACacheLayer)

    def run(start, stop, step):
        return torch.cat([model(ids[:, t:t + step], cache=cache, use_cache=True).logits
                          for t in range(start, stop, step)], dim=1)

    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cached = torch.cat([run(0, prompt, prompt), run(prompt, S, 1)], dim=1)
        assert cache.get_seq_length() == S and cache.get_max_length() >= S
        ok, err = close(cached, full)
        assert ok, err
        cache.crop(-5)
        assert cache.get_seq_length() == S - 5
        ok, err = close(run(S - 5, S, 1), full[:, -5:])
        assert ok, err
        cache.reset()
        ok, err = close(run(0, 20, 20), full[:, :20])
        assert ok, err
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="convert the model's attention"):
        cache.update(torch.zeros(B, 2, 1, 32), torch.zeros(B, 2, 1, 32), 1)


def test_m3_generate_equals_transformers_generate():
    model = m3_model()
    ids = token_ids()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        use_msa_kernels(model)
        got = model.generate(ids, max_new_tokens=NEW, do_sample=False, cache=msa_cache(model, B, S + NEW))
    assert got.shape == (B, S + NEW)
    assert torch.equal(got, expected)


def test_m3_refuses_what_msa_cannot_express():
    ids = token_ids(40)
    with pytest.raises(ValueError, match="index heads"):
        use_msa_kernels(m3_model(index_n_heads=1))
    with pytest.raises(ValueError, match="block_size"):
        use_msa_kernels(m3_model(index_block_size=4))
    with pytest.raises(ValueError, match="no MiniMax-M3 sparse attention"):
        use_msa_kernels(m3_model(layer_types=["full_attention"]))
    with pytest.raises(ValueError, match="use_msa_kernels"):
        msa_cache(m3_model(), B, S)
    narrow = use_msa_kernels(m3_model(index_head_dim=8))  # RoPE rotates 16 dims
    with pytest.raises(ValueError, match="RoPE rotates 16 dims"), torch.no_grad():
        narrow(ids)

    model = use_msa_kernels(m3_model())
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    for implementation in ("eager", "sdpa"):  # an additive float mask, a boolean one
        model.set_attn_implementation(implementation)
        with pytest.raises(ValueError, match="padding"), torch.no_grad():
            model(ids, attention_mask=padded)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)  # a prefill needs no index keys from the cache
        with pytest.raises(ValueError, match=r"cache=msa_cache\("):
            model(ids[:, :1], cache=cache, use_cache=True)


# --------------------------------------------------------------------------------- Llama / Qwen2 / Qwen3 / Mistral


FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q / k / v biases
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),  # q_norm / k_norm
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),  # a 4096-token sliding window
}


def family_model(family, **overrides):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    return perturb(model_cls(config))


def greedy(model, ids, steps=NEW):
    """Greedy decoding by full forwards, no cache."""
    for _ in range(steps):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_warmup_equals_original_and_sparse_is_msa(family):
    original = family_model(family)
    ids = token_ids()
    with torch.no_grad():
        expected = original(ids).logits
        model = convert_to_msa(copy.deepcopy(original), block_size=16, topk=2)
        assert model.config.msa == dict(index_head_dim=16, block_size=16, topk=2, local_blocks=1, mode="warmup")
        warmup = model(ids).logits
        set_msa_mode(model, "sparse")
        sparse = model(ids).logits
        every_block = convert_to_msa(copy.deepcopy(original), block_size=16, topk=5, mode="sparse")(ids).logits
    ok, err = close(warmup, expected)
    assert ok, err
    ok, err = close(every_block, expected)
    assert ok, err
    assert not torch.allclose(sparse, expected, atol=1e-2), "top-2 of 5 blocks must drop keys"
    assert torch.allclose(sparse[:, :32], expected[:, :32], atol=ATOL), "2 blocks are all the first 32 tokens see"


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_losses_train_the_index_projections_only(family):
    model = convert_to_msa(family_model(family), block_size=16, topk=2).train()
    ids = token_ids()
    index_params = {name for name, _ in model.named_parameters() if ".index_" in name}
    assert len(index_params) == 2 * TINY["num_hidden_layers"]
    for mode in ("warmup", "sparse"):
        set_msa_mode(model, mode)
        model.zero_grad(set_to_none=True)
        model(ids).logits.float().pow(2).mean().backward()  # an LM-like loss reaches all but the index branch
        for name, p in model.named_parameters():
            reached = p.grad is not None and bool(p.grad.any())
            assert reached == (name not in index_params), (mode, name)

        model.zero_grad(set_to_none=True)
        losses = kl_losses(model)
        assert len(losses) == TINY["num_hidden_layers"]
        assert all(loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss) for loss in losses)
        sum(losses).backward()
        for name, p in model.named_parameters():
            reached = p.grad is not None and bool(p.grad.any())
            assert reached == (name in index_params), (mode, name)
    model.eval()
    with torch.no_grad():
        model(ids)
    assert kl_losses(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_checkpoint_round_trips(family, tmp_path):
    _, model_cls = FAMILIES[family]
    model = convert_to_msa(family_model(family), block_size=16, topk=2, local_blocks=2, mode="sparse")
    ids = token_ids()
    model.save_pretrained(tmp_path)
    loaded, info = load_msa_model(model_cls, tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(loaded, model_cls) and loaded.config.msa == model.config.msa
    assert loaded.model.layers[0].self_attn.msa_options["mode"] == "sparse"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_generates_on_the_msa_cache(family):
    model = family_model(family)
    ids = token_ids()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        convert_to_msa(model, block_size=16, topk=2)
        warmup = model.generate(ids, max_new_tokens=NEW, do_sample=False, cache=msa_cache(model, B, S + NEW))
        set_msa_mode(model, "sparse")
        sparse = model.generate(ids, max_new_tokens=NEW, do_sample=False, cache=msa_cache(model, B, S + NEW))
        without_cache = greedy(model, ids)
    assert torch.equal(warmup, expected)
    assert torch.equal(sparse, without_cache)


def test_convert_to_msa_refuses_what_msa_cannot_express():
    ids = token_ids(40)
    with pytest.raises(ValueError, match="block_size"):
        convert_to_msa(family_model("llama"), block_size=4)
    with pytest.raises(ValueError, match="mode"):
        convert_to_msa(family_model("llama"), mode="dense")
    with pytest.raises(ValueError, match="attention_dropout"):
        convert_to_msa(family_model("llama", attention_dropout=0.1))
    with pytest.raises(ValueError, match="no unconverted"):
        convert_to_msa(convert_to_msa(family_model("llama")))
    with pytest.raises(ValueError, match="convert_to_msa first"):
        set_msa_mode(family_model("qwen3"), "sparse")
    with pytest.raises(ValueError, match="config.msa"):
        msa_model_class(transformers.LlamaForCausalLM)(transformers.LlamaConfig(**TINY))

    windowed = convert_to_msa(family_model("mistral", sliding_window=32), block_size=16, topk=2)
    with torch.no_grad():
        windowed(ids[:, :32])  # within the window the attention is causal
        with pytest.raises(ValueError, match="window of 32"):
            windowed(ids)
    model = convert_to_msa(family_model("qwen2"), block_size=16, topk=2, mode="sparse")
    padded = torch.ones_like(ids)
    padded[1, -4:] = 0
    with pytest.raises(ValueError, match="padding"), torch.no_grad():
        model(ids, attention_mask=padded)
    with pytest.raises(ValueError, match=r"cache=msa_cache\("), torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)


def test_index_heads_narrower_than_rope_rotate_the_highest_frequencies(monkeypatch):
    """index_head_dim 8 < the 16 RoPE dims: the index heads rotate all 8 dims with the 4 highest frequencies,
    so the index score of a (query, key) pair depends on their offset only."""
    model = convert_to_msa(family_model("llama"), index_head_dim=8, block_size=16, topk=2, mode="sparse")
    attn = model.model.layers[0].self_attn
    assert attn.index_q_proj.weight.shape == (2 * 8, 64) and attn.index_k_proj.weight.shape == (8, 64)
    captured = {}
    attend = type(attn)._msa_attend

    def capture(self, q, k, v, q_idx, k_idx, *args, **kwargs):
        captured.update(q_idx=q_idx, k_idx=k_idx)
        return attend(self, q, k, v, q_idx, k_idx, *args, **kwargs)

    monkeypatch.setattr(type(attn), "_msa_attend", capture)
    x = torch.randn(1, 2, 64).expand(2, -1, -1)  # the same two tokens, at positions (0, 5) and (30, 35)
    with torch.no_grad():
        attn(x, model.model.rotary_emb(x, torch.tensor([[0, 5], [30, 35]])), None)
    scores = torch.einsum("bgd,bd->bg", captured["q_idx"][:, 1], captured["k_idx"][:, 0, 0])  # 2nd token to 1st
    assert torch.allclose(scores[0], scores[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(captured["k_idx"][0], captured["k_idx"][1], atol=1e-3), "the keys must be rotated"


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_documents_equal_each_document_alone(family, mode):
    """Documents packed into one row, passed as transformers' FlashAttention kwargs (cu_seq_lens_q / max_length_q,
    positions restarting per document): each document's logits and the layers' KL losses are those of the
    document run alone (a query attending across a border would change them)."""
    model = convert_to_msa(family_model(family), block_size=16, topk=2, mode=mode).train()
    lengths = [37, 1, 50, 16]
    ids = torch.randint(0, TINY["vocab_size"], (1, sum(lengths)))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, position_ids=positions, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                   max_length_q=max(lengths), max_length_k=max(lengths)).logits
    packed_kl = [loss.detach() for loss in kl_losses(model)]
    alone, alone_kl = [], [0.0] * len(packed_kl)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        alone.append(model(ids[:, a:b]).logits)
        alone_kl = [total + loss.detach() * (b - a) / ids.shape[1] for total, loss in zip(alone_kl, kl_losses(model))]
    ok, err = close(packed, torch.cat(alone, dim=1))
    assert ok, err
    for got, want in zip(packed_kl, alone_kl):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
