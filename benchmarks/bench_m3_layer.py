"""MiniMax-M3's sparse attention layer: transformers' own path against the same layer on msa-tl's kernels.

    python -m benchmarks.bench_m3_layer [--seq-lens 8192 16384 32768 65536 131072]

The layer is transformers' ``MiniMaxM3VLAttention`` at the released model's attention shape (hidden 6144, 64 query
heads over 4 KV heads of 128, an index head of 128 per KV head, Bk 128, top-16, one local block, RoPE on 64 of 128
dims), random bf16 weights, B = 1. transformers scores every key with its indexer ([B, 4, N, N] fp32) and then runs
SDPA under a dense [B, 64, N, N] mask: O(N^2) memory, dense time. Ours is ``MSAAttention.from_dense`` of the same
module (its indexer, norms and RoPE copied), which runs select + sparse attention. Both forwards are timed in this
process; where transformers runs out of memory the row says so. Writes ``m3_layer.csv``.
"""

from __future__ import annotations

import argparse

import torch

from msa_tl import MSAAttention
from msa_tl.benchmark import BenchTable, time_ms

M3_ATTENTION = dict(hidden_size=6144, num_attention_heads=64, num_key_value_heads=4, head_dim=128, index_n_heads=4,
                    index_head_dim=128, index_block_size=128, index_topk_blocks=16, index_local_blocks=1)


def m3_layer(device="cuda", dtype=torch.bfloat16, seed=0):
    """(transformers' M3 sparse attention module with random weights, its rotary embedding)."""
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m3

    rope = {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}  # rotary_dim 64 is not read
    config = m3.MiniMaxM3VLTextConfig(**M3_ATTENTION, num_hidden_layers=1, vocab_size=128, bos_token_id=None,
                                      eos_token_id=None, layer_types=["minimax_m3_sparse"], mlp_layer_types=["dense"],
                                      rope_parameters=rope)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    attn = m3.MiniMaxM3VLAttention(config, layer_idx=0)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "norm" in name:  # Gemma norms start at 0 (x * 1); random weights make a skipped norm visible
                p.normal_(0.0, 0.2)
    return attn.to(device, dtype).eval(), m3.MiniMaxM3VLRotaryEmbedding(config).to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--results-root", default=None)
    args = parser.parse_args(argv)
    attn, rotary = m3_layer()
    ours = MSAAttention.from_dense(attn).eval()
    table = BenchTable("m3_layer")
    for N in args.seq_lens:
        x = torch.randn(1, N, M3_ATTENTION["hidden_size"], device="cuda", dtype=torch.bfloat16)
        positions = torch.arange(N, device="cuda")[None]
        cos_sin = rotary(x, positions)
        row = dict(B=1, N=N, Hq=64, G=4, D=128, Di=128, Bk=128, k=16, dtype="bf16")
        with torch.no_grad():
            out = ours(x, cos_sin, compute_kl=False).output
            ours_ms = time_ms(lambda: ours(x, cos_sin, compute_kl=False), rep_ms=500)
            try:
                theirs = attn(x, cos_sin, None, position_ids=positions)[0]
                rel = ((out.double() - theirs.double()).norm() / theirs.double().norm()).item()
                del theirs
                theirs_ms = time_ms(lambda: attn(x, cos_sin, None, position_ids=positions), rep_ms=500)
            except torch.cuda.OutOfMemoryError:
                theirs_ms, rel = float("nan"), float("nan")
            torch.cuda.empty_cache()
        table.add(**row, ours_ms=ours_ms, transformers_ms=theirs_ms, speedup=theirs_ms / ours_ms, rel_diff=rel,
                  transformers="OOM" if theirs_ms != theirs_ms else "ran")
        print(f"N={N:>7} ours {ours_ms:9.3f} ms  transformers "
              f"{'out of memory' if theirs_ms != theirs_ms else f'{theirs_ms:9.3f} ms'}  rel diff {rel:.2e}",
              flush=True)
        del x, cos_sin, out
        torch.cuda.empty_cache()
    print(table.markdown(["N", "ours_ms", "transformers_ms", "speedup", "rel_diff"]))
    print("wrote", table.write_csv(args.results_root))


if __name__ == "__main__":
    main()
