"""Evidence that MSA trains: key-value recall, trained dense -> indexer warmup -> sparse.

    python -m benchmarks.train_kv_recall                 # GPU run (a few minutes), N = 8192, needles 4K-8K back
    python -m benchmarks.train_kv_recall --plot CSV      # the figure from a finished run's CSV (needs matplotlib)

Task: P needle pairs (key, value) sit at random places in a sequence of filler tokens. The last 2P
tokens ask each key again, and the model must emit its value. The loss counts only those answers.
The model is an embedding plus a token shift (each position also sees the previous token's
embedding, so one attention layer can do induction), ``--layers`` MSA blocks (attention + MLP, pre-norm),
and a head.

Phases (``--dense-steps``, then ``--steps`` each):
1. ``dense``: MSA layers in warmup mode (dense SDPA), KL off; the task is learned, on a curriculum of
   lengths doubling from ``--dense-seq-start`` to ``--seq`` (from chance, a 1-layer model learns recall
   fast only on short sequences).
2. ``warmup``: still dense, KL on; only the index projections learn from it (they are detached from the
   LM loss and the KL reaches nothing else).
3. ``sparse``: switched to sparse mode (top-k blocks), LM + KL.

Logged every ``--eval-every`` steps:
- LM loss, KL loss and answer accuracy in the current mode;
- answer accuracy of the same weights in sparse mode and in dense mode;
- recall, i.e. the fraction of the teacher's top non-local blocks that the index branch picks. The
  teacher is the dense attention mass per block, averaged over the group's heads, at the answer
  positions;
- fp8_recall: the share of the index branch's blocks (every query) that FP8 index scoring chooses too, once the
  indexer is trained: the FP8 selection's recall on trained-indexer inputs (issue 14).
Writes ``kv_recall_training.csv`` (and ``--plot`` a PNG) under the results folder.
"""

import argparse
import copy
import math
import time

import torch
from torch import nn

from msa_tl.benchmark import BenchTable
from msa_tl.ops import MSAAttention
from msa_tl.ops.functional import select_blocks


class RecallModel(nn.Module):
    def __init__(self, vocab, hidden, layers, heads, kv_heads, head_dim, block_size, topk):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.shift = nn.Embedding(vocab, hidden)  # the previous token, so induction needs one attention layer
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                norm1=nn.LayerNorm(hidden), norm2=nn.LayerNorm(hidden),
                attn=MSAAttention(hidden, heads, kv_heads, head_dim, head_dim, block_size, topk, mode="warmup"),
                mlp=nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)))))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def set_mode(self, mode):
        for block in self.blocks:
            block["attn"].set_mode(mode)

    def forward(self, tokens, compute_kl):
        prev = torch.nn.functional.pad(tokens[:, :-1], (1, 0))
        x = self.embed(tokens) + self.shift(prev)
        kl = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            out = block["attn"](block["norm1"](x), compute_kl=compute_kl)
            x = x + out.output
            x = x + block["mlp"](block["norm2"](x))
            if out.kl_loss is not None:
                kl = kl + out.kl_loss
        return self.head(self.norm(x)), kl


def make_batch(batch, seq, pairs, keys, fillers, min_back, generator, device):
    """tokens [B, N] and the answer positions [B, P] (where the model must emit a value)."""
    values0 = keys  # token ids: keys [0, keys), values [keys, 2 keys), filler after
    tokens = torch.randint(2 * keys, 2 * keys + fillers, (batch, seq), generator=generator)
    answers = torch.empty(batch, pairs, dtype=torch.long)
    for b in range(batch):
        key = torch.randperm(keys, generator=generator)[:pairs]
        value = values0 + torch.randint(0, keys, (pairs,), generator=generator)
        query_start = seq - 2 * pairs
        slots = torch.randperm(max(1, (query_start - min_back) // 2), generator=generator)[:pairs] * 2
        tokens[b, slots], tokens[b, slots + 1] = key, value
        order = torch.randperm(pairs, generator=generator)
        tokens[b, query_start::2], tokens[b, query_start + 1::2] = key[order], value[order]
        answers[b] = query_start + 1 + 2 * torch.arange(pairs)
    return tokens.to(device), answers.to(device)


def curriculum_seq(step, steps, start, final):
    """Sequence length of a dense-phase step: doubling from ``start`` to ``final`` in equal parts of the phase,
    the last part (at least) at ``final``. There are no position embeddings, so the model carries over."""
    levels = max(1, math.ceil(math.log2(final / start)) + 1) if start < final else 1
    return min(final, start * 2 ** min(levels - 1, step * levels // max(1, steps)))


def answer_loss_and_accuracy(logits, tokens, answers):
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
    predicted = logits[rows, answers - 1].float()  # the logits at the key predict the value after it
    target = tokens[rows, answers]
    loss = torch.nn.functional.cross_entropy(predicted.flatten(0, 1), target.flatten())
    return loss, (predicted.argmax(-1) == target).float().mean().item()


@torch.no_grad()
def teacher_recall(model, tokens, answers):
    """(recall, fp8_recall): the mean over layers of |index top-k ∩ teacher top-(k-1) non-local blocks| / (k-1) at
    the answer positions, and the share of the index's blocks (every query, every layer) that FP8 index scoring
    (``select_blocks(..., index_fp8=True)``) chooses too: issue 14's FP8 recall on a trained indexer."""
    prev = torch.nn.functional.pad(tokens[:, :-1], (1, 0))
    x = model.embed(tokens) + model.shift(prev)
    recalls, fp8_recalls = [], []
    for block in model.blocks:
        attn = block["attn"]
        h = block["norm1"](x)
        B, N, _ = h.shape
        q = attn.q_proj(h).view(B, N, attn.num_heads, attn.head_dim)
        k = attn.k_proj(h).view(B, N, attn.num_kv_heads, attn.head_dim)
        q_idx = attn.index_q_proj(h).view(B, N, attn.num_kv_heads, attn.index_head_dim)
        k_idx = attn.index_k_proj(h)
        chosen = select_blocks(q_idx, k_idx, block_size=attn.block_size, topk=attn.topk)
        chosen_fp8 = select_blocks(q_idx, k_idx, block_size=attn.block_size, topk=attn.topk, index_fp8=True)
        kept = (chosen_fp8[..., :, None] == chosen[..., None, :]).any(-2) & (chosen >= 0)
        fp8_recalls.append((kept.sum() / (chosen >= 0).sum()).item())
        rows = answers - 1
        Bk, G, R = attn.block_size, attn.num_kv_heads, attn.num_heads // attn.num_kv_heads
        for b in range(B):
            qb = q[b, rows[b]].double().view(-1, G, R, attn.head_dim)  # [P, G, R, D]
            s = torch.einsum("pgrd,jgd->pgrj", qb, k[b].double()) / math.sqrt(attn.head_dim)
            s = s.masked_fill(torch.arange(N, device=s.device)[None, None, None, :] > rows[b][:, None, None, None],
                              float("-inf"))
            mass = torch.softmax(s, -1).mean(2)  # [P, G, N]
            nblk = math.ceil(N / Bk)
            mass = torch.nn.functional.pad(mass, (0, nblk * Bk - N)).view(*mass.shape[:2], nblk, Bk).sum(-1)
            local = (rows[b] // Bk)[:, None]
            mass.scatter_(-1, local[:, :, None].expand(-1, G, 1), -1.0)  # the local block is forced, not ranked
            top = mass.topk(attn.topk - 1, dim=-1).indices  # [P, G, k-1]
            picked = chosen[b, rows[b]].long()  # [P, G, k]
            hit = (top[..., :, None] == picked[..., None, :]).any(-1).float()
            recalls.append(hit.mean().item())
        x = x + attn(h, compute_kl=False).output
        x = x + block["mlp"](block["norm2"](x))
    return sum(recalls) / len(recalls), sum(fp8_recalls) / len(fp8_recalls)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--min-back", type=int, default=4096, help="needles sit at least this far before the queries")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dense-steps", type=int, default=3000,
                        help="steps of the dense phase (recall is learned abruptly after a plateau: on the CPU "
                             "a 1-layer model solved N=128 in 200 steps, and was still near chance at N=256 after 1000)")
    parser.add_argument("--dense-seq-start", type=int, default=128,
                        help="the dense phase starts at this length and doubles up to --seq (a curriculum)")
    parser.add_argument("--steps", type=int, default=300, help="steps of the warmup and of the sparse phase")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-root", default=None)
    parser.add_argument("--plot", metavar="CSV", default=None, help="only draw the figure of a finished run")
    args = parser.parse_args(argv)
    if args.plot:
        return plot(args.plot)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    keys, fillers = 64, 64
    model = RecallModel(2 * keys + fillers, args.hidden, args.layers, args.heads, args.kv_heads, args.head_dim,
                        args.block_size, args.topk).to(device)
    index_params = [p for blk in model.blocks for p in blk["attn"].index_parameters()]
    index_ids = {id(p) for p in index_params}
    main_params = [p for p in model.parameters() if id(p) not in index_ids]
    optimizer = torch.optim.AdamW([{"params": main_params}, {"params": index_params}], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    eval_batch = make_batch(args.batch, args.seq, args.pairs, keys, fillers, args.min_back,
                            torch.Generator().manual_seed(args.seed + 1), device)
    table = BenchTable("kv_recall_training")
    setup = dict(seq=args.seq, min_back=args.min_back, pairs=args.pairs, batch=args.batch, layers=args.layers,
                 heads=args.heads, kv_heads=args.kv_heads, block_size=args.block_size, topk=args.topk)
    start = time.perf_counter()
    for phase in ("dense", "warmup", "sparse"):
        model.set_mode("sparse" if phase == "sparse" else "warmup")
        steps = args.dense_steps if phase == "dense" else args.steps
        for step in range(steps):
            seq, min_back = args.seq, args.min_back
            if phase == "dense":  # curriculum: the induction circuit forms fast on short sequences, then carries over
                seq = curriculum_seq(step, steps, args.dense_seq_start, args.seq)
                min_back = min(args.min_back, seq // 2)
            tokens, answers = make_batch(args.batch, seq, args.pairs, keys, fillers, min_back, generator, device)
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                logits, kl = model(tokens, compute_kl=phase != "dense")
            lm_loss, accuracy = answer_loss_and_accuracy(logits, tokens, answers)
            optimizer.zero_grad(set_to_none=True)
            (lm_loss + kl).backward()
            optimizer.step()
            if step % args.eval_every == 0 or step == steps - 1:
                row = evaluate(model, eval_batch, phase, dtype, device)
                table.add(**setup, phase=phase, step=step, lm_loss=lm_loss.item(), kl_loss=kl.item(),
                          train_accuracy=accuracy, **row)
                print(f"[{time.perf_counter() - start:7.1f}s] {phase:<6} step {step:4d}  lm {lm_loss.item():.3f}  "
                      f"kl {kl.item():.4f}  acc {accuracy:.2f}  | eval: dense {row['dense_accuracy']:.2f}  "
                      f"sparse {row['sparse_accuracy']:.2f}  recall {row['recall']:.2f}  FP8 recall "
                      f"{row['fp8_recall']:.3f}", flush=True)
                path = table.write_csv(args.results_root)  # a cut run keeps its rows
    print("wrote", path)
    return 0


@torch.no_grad()
def evaluate(model, batch, phase, dtype, device):
    tokens, answers = batch
    scores = {}
    for mode in ("warmup", "sparse"):
        probe = copy.deepcopy(model).eval()
        probe.set_mode(mode)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits, _ = probe(tokens, compute_kl=False)
        scores["dense_accuracy" if mode == "warmup" else "sparse_accuracy"] = answer_loss_and_accuracy(
            logits, tokens, answers)[1]
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        scores["recall"], scores["fp8_recall"] = teacher_recall(model, tokens, answers)
    return scores


def plot(csv_path):
    import pandas as pd

    from benchmarks.phase_plot import plot_phases

    frame = pd.read_csv(csv_path)
    frame["t"] = range(len(frame))

    def kl_panel(ax, part, color, phase):
        if phase != "dense":  # the dense phase trains without the KL loss
            ax.plot(part.t, part.kl_loss, "o-", color=color, label=phase)
        if phase == "sparse":
            ax.set_xlim(-0.5, len(frame) - 0.5)  # the recall panel's span: the dense phase draws no KL

    setup = frame.iloc[0]
    plot_phases(frame, csv_path, kl_panel,
                ("KL loss (warmup: all visible tokens, sparse: chosen)", "recall of the teacher's top blocks",
                 "answer accuracy"), "evaluation point",
                f"KV recall, N={setup.seq}, needles >= {setup.min_back} back, Bk={setup.block_size}, k={setup.topk} "
                f"({setup.gpu}, {setup.date})")
    return 0

if __name__ == "__main__":
    main()
