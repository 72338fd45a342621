"""Every TileLang program once, at a small ragged shape with B = 2, a hot block and -1 slots, for
compute-sanitizer (issue 13):

    compute-sanitizer --tool memcheck  python -m benchmarks.sanitize_run
    compute-sanitizer --tool racecheck python -m benchmarks.sanitize_run
    compute-sanitizer --tool initcheck python -m benchmarks.sanitize_run

Each stage prints its name before it runs, so a report can be placed; ``--only TEXT`` runs the stages whose name
holds TEXT (``--only "shared tiles"``).
"""

import argparse
import math

import torch

from msa_tl import reference
from msa_tl.index.select import select_blocks
from msa_tl.kl_loss import kl_alignment_loss_forward
from msa_tl.attention.kv_outer import sparse_attention_forward
from msa_tl.attention.backward import sparse_attention_backward


def hot_selection(B, N, G, Bk, topk, device):
    """Block 0 for every query, then its most recent blocks, with -1 where fewer exist, canonical order."""
    local = (torch.arange(N, device=device) // Bk)[None, :, None, None]
    cand = torch.cat([local - torch.arange(topk - 1, device=device), 0 * local], dim=-1)
    cand = torch.where((cand >= 0) & (cand <= local), cand, -1)
    dup = (cand[..., :, None] == cand[..., None, :]).triu(1).any(-2) & (cand >= 0)
    cand = torch.where(dup, -1, cand).sort(dim=-1, descending=True).values
    return cand.expand(B, N, G, topk).int().contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=777)
    parser.add_argument("--only", default="", help="run only the stages whose name contains this text")
    args = parser.parse_args(argv)
    B, N, Hq, G, D, Di, Bk, topk = 2, args.seq_len, 32, 2, 128, 128, 64, 6
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v = rand(B, N, Hq, D), rand(B, N, G, D), rand(B, N, G, D)
    q_idx, k_idx = rand(B, N, G, Di), rand(B, N, Di)
    scale = 1.0 / math.sqrt(D)

    def stage(name, fn):
        if args.only not in name:
            return None
        print(f"== {name}", flush=True)
        out = fn()
        torch.cuda.synchronize()
        return out

    for method in ("pipelined", "fused", "two_pass"):
        stage(f"select ({method})", lambda: select_blocks(q_idx, k_idx, Bk, topk, method=method, query_chunk=256))
    hot = hot_selection(B, N, G, Bk, topk, "cuda")
    # the hot selection's tiles are all shared: the KV-outer stages turn shared tiles off to reach its kernels
    kv_outer = dict(query_chunk=256, shared_tiles=False)
    forward = lambda: sparse_attention_forward(q, k, v, hot, Bk, **kv_outer)  # noqa: E731
    stage("forward (KV-outer + combine)", forward)
    stage("forward (a schedule build per chunk)", lambda: sparse_attention_forward(q, k, v, hot, Bk, **kv_outer,
                                                                                   build_once=False))
    stage("forward (persistent combine)", lambda: sparse_attention_forward(q, k, v, hot, Bk, **kv_outer,
                                                                           persistent_combine=True))
    stage("forward (persistent attention, 3 CTAs)", lambda: sparse_attention_forward(
        q, k, v, hot, Bk, **kv_outer, attention_config=dict(persistent=True, ctas=3)))
    stage("forward (store warp)", lambda: sparse_attention_forward(q, k, v, hot, Bk, **kv_outer,
                                                                   attention_config=dict(store_warp=True)))
    stage("forward (combine on a side stream)", lambda: sparse_attention_forward(q, k, v, hot, Bk, **kv_outer,
                                                                                 combine_ctas=3))
    stage("forward (combine warps)", lambda: sparse_attention_forward(
        q, k, v, hot, Bk, **kv_outer, attention_config=dict(store_warp=True, combine_warps=True)))
    stage("forward (shared tiles)", lambda: sparse_attention_forward(q, k, v, hot, Bk, shared_tiles=True))
    stage("forward (local combine)", lambda: sparse_attention_forward(q, k, v, hot, Bk, **kv_outer, local_combine=True))
    # every third query without block 0 (unless it is its own): the tiles holding one are not shared, so the list
    # of shared tiles holds some of them and the KV-outer chunks the rest
    position = torch.arange(N, device="cuda")[None, :, None, None]
    mixed = torch.where((hot == 0) & (position >= Bk) & (position % 3 == 0), -1, hot)
    mixed = mixed.sort(dim=-1, descending=True).values.contiguous()
    for listed in (True, False):
        stage(f"forward (shared tiles {'listed' if listed else 'every triple'} on a side stream, local combine, "
              f"row prep a warp a tile)", lambda listed=listed: sparse_attention_forward(
                  q, k, v, mixed, Bk, query_chunk=256, shared_tiles=True, local_combine=True, fused_prep="warps",
                  tiles_stream=True, tile_config=dict(listed=listed)))
    stage("forward (shared tiles listed, partials)", lambda: sparse_attention_forward(
        q, k, v, mixed, Bk, query_chunk=256, shared_tiles=True, local_combine=False))
    stage("forward (accumulators)", lambda: sparse_attention_forward(
        q, k, v, hot, Bk, shared_tiles=False, accumulate=True, accumulate_config=dict(query_chunk=256)))
    stage("forward (fp32 partials, thread stores)", lambda: sparse_attention_forward(
        q, k, v, hot, Bk, **kv_outer, partial_dtype=torch.float32, attention_config=dict(tma_stores=False)))
    do = torch.randn_like(q)
    # The backward's and the KL's O / LSE come from the float64 reference, not our forward: both combines read
    # unused slots' never-written partials under a select (initcheck reports those reads, NOTES.md), and excluding
    # a combine from the check would leave its outputs looking uninitialised to the kernels after it.
    o_ref, lse_ref = reference.sparse_attention(q, k, v, hot, Bk)
    o_ref, lse_ref = o_ref.to(q.dtype), lse_ref.float()
    for dq_partials in (True, False):
        stage(f"backward (dq partials: {dq_partials})", lambda: sparse_attention_backward(
            do, None, q, k, v, hot, o_ref, lse_ref, Bk, query_chunk=256, config=dict(dq_partials=dq_partials)))
    stage("KL (sparse, with gradients)", lambda: kl_alignment_loss_forward(q, k, q_idx, k_idx, hot, Bk, scale,
                                                                           scale, lse_ref, with_grads=True))
    dense_lse = reference.sparse_attention(q, k, v, None, Bk)[1].float()  # the teacher's LSE over every visible key
    stage("KL (warmup: every visible block)", lambda: kl_alignment_loss_forward(q, k, q_idx, k_idx, None, Bk, scale,
                                                                                scale, dense_lse, with_grads=True))
    print("done", flush=True)


if __name__ == "__main__":
    main()
