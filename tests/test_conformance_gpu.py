"""Randomized conformance of the public main-branch op against the float64 reference (`pytest -m gpu`).

Every case is drawn from its seed (``CASE_SEEDS``; a failure replays with ``-k seed17``): batch, a ragged
length from 1 to 20K, one of ``LAYOUTS`` (GQA ratio, KV/index heads, head and index dims, block size, top-k,
dtype) and a selection pattern (the index kernels' own, realistic, hot, rows with nothing chosen, hostile
ids, a NaN key). Outputs, LSE and (up to 4K queries) gradients are held to FA3's calibration: the kernel's
largest error against float64 is at most twice that of a torch computation in the input dtype (masked
attention in bf16 / fp16) plus twice the dtype's rounding of the reference. Gradients are checked where
that baseline's graph fits (B * Hq * N^2 <= 2^30 scores).
"""

import contextlib
import fcntl
import math
import os
import random
import tempfile
import time

import pytest
import torch

from msa_tl import reference as R
from msa_tl.checks import assert_same_selection_up_to_ties

pytestmark = pytest.mark.gpu

bf16, fp16 = torch.bfloat16, torch.float16
LAYOUTS = [  # (Hq, G, D, Di, Bk, topk, dtype)
    (64, 4, 128, 128, 128, 16, bf16),  # the paper
    (16, 2, 64, 64, 64, 8, bf16),
    (28, 4, 128, 128, 128, 8, bf16),  # Qwen2.5-7B: ratio 7, run padded to 8
    (8, 8, 64, 64, 64, 4, fp16),  # ratio 1
    (32, 1, 128, 64, 128, 6, bf16),  # one KV head, ratio 32
    (24, 4, 96, 96, 64, 4, bf16),  # head and index dim 96, ratio 6
    (12, 3, 64, 64, 128, 5, bf16),  # 3 KV / index heads (the select runs 4)
    (32, 16, 64, 64, 64, 4, bf16),  # 16 KV / index heads
]
PATTERNS = ("index", "realistic", "hot", "empty_rows", "hostile", "nan_key")
CASE_SEEDS = list(range(200))
GRAD_MAX_SEQ = 4096
GRAD_MAX_SCORES = 2**30  # the input-dtype baseline keeps its whole graph (B * Hq * N^2 scores) for gradients
BASELINE_CHUNK_SCORES = 2**27  # scores a query chunk of the input-dtype baseline holds without gradients
# Under pytest-xdist every worker's caching allocator keeps its largest case's memory: eight workers each holding
# 15-28 GB ran an H200 out of memory. So a case frees its cache when done, and at most BIG_CASE_SLOTS cases whose
# baseline needs more than BIG_CASE_BYTES run at once across workers.
BIG_CASE_BYTES = 4 << 30
BIG_CASE_SLOTS = 2


def draw_case(seed: int) -> dict:
    """The case of ``seed``: every layout 25 times, the patterns in turn, B and N at random."""
    rng = random.Random(seed)
    Hq, G, D, Di, Bk, topk, dtype = LAYOUTS[seed % len(LAYOUTS)]
    pattern = PATTERNS[seed // len(LAYOUTS) % len(PATTERNS)]
    size = rng.random()
    N = rng.randint(1, 600) if size < 0.4 else rng.randint(600, GRAD_MAX_SEQ) if size < 0.85 else rng.randint(
        GRAD_MAX_SEQ + 1, 20000)
    B = rng.choice((1, 1, 2)) if N <= GRAD_MAX_SEQ else 1
    return dict(seed=seed, B=B, N=N, Hq=Hq, G=G, D=D, Di=Di, Bk=Bk, topk=topk, dtype=dtype, pattern=pattern,
                grads=B * Hq * N * N <= GRAD_MAX_SCORES and pattern != "nan_key")


def draw_indices(case, q_idx, k_idx, gen) -> torch.Tensor:
    """Indices [B, N, G, topk] int32 of the case's pattern, on q_idx's device."""
    import msa_tl

    B, N, G, Bk, topk = case["B"], case["N"], case["G"], case["Bk"], case["topk"]
    device = q_idx.device
    nblk = math.ceil(N / Bk)
    local = (torch.arange(N, device=device) // Bk)[None, :, None, None]
    if case["pattern"] in ("index", "empty_rows", "nan_key"):
        indices = msa_tl.select_blocks(q_idx, k_idx, block_size=Bk, topk=topk)
        if case["pattern"] == "empty_rows":
            indices = indices.clone()
            indices[:, torch.randperm(N, generator=gen, device="cpu")[: max(1, N // 9)].to(device)] = -1
        return indices
    if case["pattern"] == "hostile":  # past the end, in the future, repeated, negative
        raw = torch.randint(-3, nblk + 3, (B, N, G, topk), generator=gen, device="cpu", dtype=torch.int32)
        raw[:, ::5, :, -1] = raw[:, ::5, :, 0]
        return raw.to(device)
    slots = torch.arange(topk, device=device)
    if case["pattern"] == "realistic":  # local, block 0, the three before the local, then a stripe every 8 back
        cand = torch.cat([local, 0 * local, local - 1, local - 2, local - 3,
                          local - (local - 5) % 8 - 8 * slots], dim=-1)[..., :topk]
    else:  # hot: every query on block 0, then its most recent blocks
        cand = torch.cat([0 * local, local - slots[: topk - 1]], dim=-1)
    return torch.where((cand >= 0) & (cand <= local), cand, -1).expand(B, N, G, topk).int().contiguous()


def dtype_baseline(q, k, v, indices, Bk, do=None):
    """Masked attention in the input dtype (scores, probabilities and output rounded to it), as FA3's
    ``attention_ref(upcast=False)``: (o, lse[, dq, dk, dv]); a row with nothing visible gives o = 0. Without
    ``do`` it runs in query chunks (its scores would take Hq * N^2 elements at once)."""
    B, N, Hq, D = q.shape
    G = k.shape[2]
    q, k, v = (t.detach().requires_grad_(do is not None) for t in (q, k, v))
    chunk = N if do is not None else max(1, BASELINE_CHUNK_SCORES // (B * Hq * N))
    outs, lses = [], []
    for t0 in range(0, N, chunk):
        t1 = min(N, t0 + chunk)
        mask = R._chunk_mask(indices, t0, t1, N, Bk, q.device)[:, :, None]  # [B, G, 1, C, N]
        s = torch.einsum("bcgrd,bjgd->bgrcj", q[:, t0:t1].reshape(B, t1 - t0, G, Hq // G, D), k) / math.sqrt(D)
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.where(mask.any(-1, keepdim=True), torch.softmax(s, dim=-1), 0.0)
        outs.append(torch.einsum("bgrcj,bjgd->bcgrd", p, v).reshape(B, t1 - t0, Hq, D))
        lses.append(torch.logsumexp(s.float(), dim=-1).permute(0, 3, 1, 2).reshape(B, t1 - t0, Hq))
    o, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)
    if do is None:
        return o, lse
    o.backward(do)
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_within_calibration(name, got, want, baseline, dtype, keep):
    """FA3's bound over the rows ``keep`` selects ([B, N, Hq] or [B, N]): max|got - want| <= 2 max|baseline -
    want| + atol."""
    got, want, baseline = got[keep].double(), want[keep], baseline[keep].double()
    atol = 2 * (want + 0.3 - 0.3 - want).abs().max().item() if want.numel() else 0.0
    rounding = 2 * (want.to(dtype).double() - want).abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    bound = 2 * (baseline - want).abs().max().item() + max(atol, rounding) if want.numel() else 0.0
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (twice the {dtype} baseline's, plus rounding)"


def check_case(case, device="cuda"):
    import msa_tl

    gen = torch.Generator().manual_seed(case["seed"])
    B, N, Hq, G, D, Di, Bk, topk, dtype = (case[k] for k in ("B", "N", "Hq", "G", "D", "Di", "Bk", "topk", "dtype"))
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    q, k, v = rand(B, N, Hq, D), rand(B, N, G, D), rand(B, N, G, D)
    q_idx, k_idx = rand(B, N, G, Di), rand(B, N, Di)
    indices = draw_indices(case, q_idx, k_idx, gen)
    if case["pattern"] == "index":
        assert_same_selection_up_to_ties(indices, q_idx, k_idx, Bk, topk)
    if case["pattern"] == "nan_key":
        k[0, N // 2, G // 2, D // 3] = float("nan")
    ref_o, ref_lse = R.sparse_attention(q, k, v, indices, Bk)
    empty = torch.isneginf(ref_lse)  # [B, N, Hq] (query, head) rows with nothing to attend to
    poisoned = torch.isnan(ref_lse)
    keep = ~empty & ~poisoned
    leaves = [t.requires_grad_(case["grads"]) for t in (q.clone(), k.clone(), v.clone())]
    o, lse = msa_tl.sparse_attention(*leaves, indices, block_size=Bk, return_lse=True)
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == (B, N, Hq)
    assert (o[empty] == 0).all() and torch.isneginf(lse[empty]).all(), "a row with nothing chosen: o = 0, lse = -inf"
    assert torch.equal(torch.isnan(lse), poisoned), "NaN reaches exactly the rows that see it"
    assert torch.isfinite(o[keep]).all() and torch.isfinite(lse[keep]).all()
    do = rand(B, N, Hq, D) if case["grads"] else None
    base = dtype_baseline(q, k, v, indices, Bk, do)
    assert_within_calibration("o", o.detach(), ref_o, base[0], dtype, keep)
    assert_within_calibration("lse", lse.detach(), ref_lse, base[1], dtype, keep)
    if not case["grads"]:
        return
    o.backward(do)
    refs = R.sparse_attention_backward(do, None, q, k, v, indices, Bk)
    dq, dk, dv = (t.grad for t in leaves)
    assert (dq[empty] == 0).all(), "a row with nothing chosen has zero dq"
    assert_within_calibration("dq", dq, refs[0], base[2], dtype, keep)
    everything = torch.ones(B, N, dtype=torch.bool, device=device)
    assert_within_calibration("dk", dk, refs[1], base[3], dtype, everything)
    assert_within_calibration("dv", dv, refs[2], base[4], dtype, everything)


def baseline_bytes(case) -> int:
    """About the peak GPU memory of a case's input-dtype baseline: ~14 bytes a score it holds at once (the scores,
    their fp32 copy, the masked scores, the probabilities; the graph with gradients)."""
    B, N, Hq = case["B"], case["N"], case["Hq"]
    chunk = N if case["grads"] else max(1, BASELINE_CHUNK_SCORES // (B * Hq * N))
    return 14 * B * Hq * N * min(N, chunk)


@contextlib.contextmanager
def gpu_memory_slot(case):
    """Runs a case whose baseline needs more than BIG_CASE_BYTES in one of BIG_CASE_SLOTS slots shared by every
    pytest-xdist worker (a lock file each), waiting for one to free; other cases run at once. Either way the
    worker's cached GPU memory is released afterwards."""
    try:
        if baseline_bytes(case) <= BIG_CASE_BYTES:
            yield
            return
        locks = [os.path.join(tempfile.gettempdir(), f"msa_tl_conformance_slot{i}.lock") for i in range(BIG_CASE_SLOTS)]
        while True:
            for path in locks:
                with open(path, "w") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    try:
                        yield
                    finally:
                        fcntl.flock(f, fcntl.LOCK_UN)
                    return
            time.sleep(0.1)
    finally:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("seed", CASE_SEEDS, ids=[f"seed{s}" for s in CASE_SEEDS])
def test_sparse_attention_conforms_to_the_reference(seed):
    case = draw_case(seed)
    with gpu_memory_slot(case):
        check_case(case)
