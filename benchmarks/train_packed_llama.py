"""End to end: a Llama trained dense on packed documents, converted to MSA, its indexer warmed up, then sparse.

    python -m benchmarks.train_packed_llama                 # GPU run: 8192 packed tokens a step, documents 256-4096
    python -m benchmarks.train_packed_llama --plot CSV      # the figure from a finished run's CSV (needs matplotlib)
    python -m benchmarks.train_packed_llama --device cpu --seq 512 --min-doc 32 --max-doc 128 --dense-doc-start 16 \
        --pairs 4 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --head-dim 16 --block-size 16 --topk 3 \
        --dense-steps 1200 --steps 150 --eval-every 100 --lr 3e-3
                            # a small CPU run on the ops' float64 reference (10 minutes on 2 busy cores: dense answer
                            # accuracy ~0.3, the indexer's recall 0.50 untrained -> 0.77 after the warmup)

Model: a ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (random init, nothing downloaded),
``--layers`` layers of ``--heads`` query heads over ``--kv-heads`` KV heads of ``--head-dim``. On CUDA its weights
are bf16 (the MSA kernels take bf16 / fp16; block size 64 or 128, head dims 64 or 128), on the CPU float32.

Data: one row of ``--seq`` tokens a step, documents of random lengths (``--min-doc`` .. ``--max-doc``) packed
into it by ``transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)``: ``position_ids`` restart
at each document, ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32) bound the documents and ``max_length_q`` /
``max_length_k`` give the longest. The model gets them as they come (transformers' FlashAttention kwargs):
its own SDPA attention masks each document off from the others (from the restarting positions), and the
converted MSA layers attend each document on its own (blocks counted from the document's first token).

Task, inside each document: a BOS, then filler tokens with up to ``--pairs`` needles (key, value) at random
places, then every key asked again, each followed by its value in the same document; the loss counts those
answers only. The documents of a row draw their keys from one pool of 2 ``--pairs`` keys, and a key shared by
documents gets a different value in each: a query is answerable from its own document only, and attention
that crossed into another document would find the key with a wrong value (it would hurt, not help).

Phases (``--dense-steps``, then ``--steps`` each):
1. ``dense``: the plain transformers model (SDPA), LM loss only, no index branch yet, on a curriculum: the longest
   document doubles from ``--dense-doc-start`` to ``--max-doc`` (from chance, recall forms on short documents,
   many to a row, and carries over to long ones);
2. ``warmup``: ``convert_to_msa(mode="warmup")`` (still the dense attention), LM + ``sum(kl_losses(model))``; the
   new index projections join the optimizer as their own group, and only they learn from the KL (their input is
   detached from the LM's graph, the KL's teacher is detached);
3. ``sparse``: ``set_msa_mode(model, "sparse")`` (each query attends to its ``--topk`` chosen blocks), LM + KL.

Logged every ``--eval-every`` steps (a line each, and a row of ``packed_llama_training.csv`` under the results
folder, ``--results-root``): the training step's LM loss, KL loss and answer accuracy (in the current mode); on a
fixed evaluation row, the answer accuracy of the same weights in dense (warmup) mode and in sparse mode, and the
recall, i.e. the fraction of the teacher's top non-local blocks that the index branch picks: the teacher is the
dense attention mass per block of the query's document, averaged over the group's heads, at the positions that
predict the answers where the document has more visible blocks than ``--topk`` (a real choice), mean over
layers. During the dense phase those sparse columns are of a converted copy, its index projections as the
conversion will initialise them (an untrained indexer).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from msa_tl import select_blocks
from msa_tl.benchmark import BenchTable

BOS = 0
IGNORE = -100  # the collator's separator_id and the labels' ignore index


# --------------------------------------------------------------------------------------------- data


def document_lengths(total: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    """Random lengths in [low, high] summing to ``total`` (one document of ``total`` when it is below ``low``; when
    what would remain cannot hold a document, the last one takes it, or leaves exactly ``low``)."""
    lengths, left = [], total
    while left > 0:
        n = int(torch.randint(low, high + 1, (1,), generator=generator))
        if left - n < low:  # what would remain cannot hold a document
            n = left if left <= high or left - low < low else left - low
        lengths.append(n)
        left -= n
    return lengths


def make_documents(seq: int, min_doc: int, max_doc: int, pairs: int, keys: int, values: int, vocab: int,
                   generator: torch.Generator) -> list[dict]:
    """The documents of one packed row, as ``DataCollatorWithFlattening``'s features: ``input_ids`` and ``labels``
    (the value token where it answers a query, else -100).

    Token ids: BOS 0, keys 1 .. keys, values keys + 1 .. keys + values, filler above. A document of length L holds
    ``min(pairs, (L - 1) // 4)`` needles (at least one). Its keys come from the row's pool of 2 ``pairs`` keys, and a
    key used by several documents gets a different value in each (while they number at most ``values``)."""
    key0, value0, filler0 = 1, 1 + keys, 1 + keys + values
    pool = key0 + torch.randperm(keys, generator=generator)[: min(keys, 2 * pairs)]
    value_order = {int(k): torch.randperm(values, generator=generator) for k in pool}  # the values a key takes, in turn
    uses = dict.fromkeys(value_order, 0)
    features = []
    for length in document_lengths(seq, min_doc, max_doc, generator):
        n = max(1, min(pairs, len(pool), (length - 1) // 4))
        tokens = torch.randint(filler0, vocab, (length,), generator=generator)
        tokens[0] = BOS
        key = pool[torch.randperm(len(pool), generator=generator)[:n]]
        value = torch.empty_like(key)
        for i, k in enumerate(key.tolist()):
            value[i] = value0 + value_order[k][uses[k] % values]
            uses[k] += 1
        query0 = length - 2 * n
        slots = 1 + 2 * torch.randperm((query0 - 1) // 2, generator=generator)[:n]  # needles between BOS and queries
        tokens[slots], tokens[slots + 1] = key, value
        order = torch.randperm(n, generator=generator)
        tokens[query0::2], tokens[query0 + 1::2] = key[order], value[order]
        labels = torch.full_like(tokens, IGNORE)
        labels[query0 + 1::2] = value[order]
        features.append(dict(input_ids=tokens.tolist(), labels=labels.tolist()))
    return features


def make_packed_batch(seq: int, min_doc: int, max_doc: int, pairs: int, keys: int, values: int, vocab: int,
                      generator: torch.Generator) -> dict:
    """One packed row of ``seq`` tokens as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives it:
    input_ids / labels / position_ids [1, seq] int64, cu_seq_lens_q / cu_seq_lens_k [docs + 1] int32,
    max_length_q / max_length_k Python ints."""
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE)
    return collate(make_documents(seq, min_doc, max_doc, pairs, keys, values, vocab, generator))


def curriculum(step: int, steps: int, start: int, min_doc: int, max_doc: int) -> tuple[int, int]:
    """(shortest, longest) document of a dense-phase step: the longest doubles from ``start`` to ``max_doc`` in equal
    parts of the phase (the last part, at least, at ``max_doc``), the shortest is half of it, at most ``min_doc``.
    Short documents pack many to a row (more answers a step) at short distances: recall forms there first."""
    if start >= max_doc:
        return min_doc, max_doc
    levels = math.ceil(math.log2(max_doc / start)) + 1
    longest = min(max_doc, start * 2 ** min(levels - 1, step * levels // max(1, steps)))
    return min(min_doc, max(9, longest // 2)), longest


def to_device(batch: dict, device) -> dict:
    return {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in batch.items()}


def forward(model, batch: dict) -> torch.Tensor:
    """Logits [1, seq, vocab] of a packed row, the FlashAttention kwargs passed through to the attention layers."""
    inputs = {name: x for name, x in batch.items() if name != "labels"}
    return model(**inputs, use_cache=False).logits


def answer_loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy and accuracy of the answers (labels != -100; the logits one token before predict them)."""
    target = labels[0, 1:]
    answered = target != IGNORE
    predicted = logits[0, :-1][answered].float()
    target = target[answered]
    loss = F.cross_entropy(predicted, target)
    return loss, (predicted.argmax(-1) == target).float().mean().item()


# --------------------------------------------------------------------------------------------- model


def build_model(args, vocab: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=args.intermediate or 4 * args.hidden, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                         max_position_embeddings=max(args.seq, args.max_doc), attention_dropout=0.0,
                         tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None,
                         attn_implementation="sdpa")  # masks packed documents off each other (restarting positions)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def convert(model, args):
    """``convert_to_msa`` in warmup mode, its index projections initialised from ``--seed`` (the same every call)."""
    from msa_tl.integrations.transformers import convert_to_msa

    device = model.lm_head.weight.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 2)
        return convert_to_msa(model, index_head_dim=args.index_head_dim or args.head_dim,
                              block_size=args.block_size, topk=args.topk, mode="warmup")


def index_parameters(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".index_q_proj." in name or ".index_k_proj." in name]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x, cos, sin):
    """RoPE of x [B, S, H, D] with (cos, sin) [B, S, rot] on the first rot dims, as the converted layers apply it
    (rot > D: all D dims with the D / 2 highest frequencies)."""
    if cos.shape[-1] > x.shape[-1]:
        half = x.shape[-1] // 2
        cos, sin = torch.cat([cos[..., :half]] * 2, -1), torch.cat([sin[..., :half]] * 2, -1)
    rot = cos.shape[-1]
    head = x[..., :rot]
    head = head * cos[:, :, None] + _rotate_half(head) * sin[:, :, None]
    return torch.cat([head.to(x.dtype), x[..., rot:]], dim=-1)


def attention_layers(model):
    return [layer.self_attn for layer in model.model.layers]


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def teacher_recall(model, captured: list[dict], batch: dict) -> float:
    """Mean over layers of |index top-k ∩ teacher top-(k-1) non-local blocks| / (k-1), at the positions that predict
    the answers, each against its own document; NaN when no answer has a real choice (more than k visible blocks).

    ``captured``: each attention layer's input (hidden_states, (cos, sin)) from a dense forward of ``batch``."""
    cu = batch["cu_seq_lens_q"]
    bounds = cu.tolist()
    rows_all = (batch["labels"][0, 1:] != IGNORE).nonzero()[:, 0]  # position t predicts the answer at t + 1
    options = model.config.msa
    Bk, topk, Di = options["block_size"], options["topk"], options["index_head_dim"]
    recalls = []
    for attn, seen in zip(attention_layers(model), captured):
        h, (cos, sin) = seen["hidden_states"], seen["position_embeddings"]
        _, T, _ = h.shape
        G, D = attn.config.num_key_value_heads, attn.head_dim
        R = attn.config.num_attention_heads // G
        q = _rope(attn.q_proj(h).view(1, T, -1, D), cos, sin)
        k = _rope(attn.k_proj(h).view(1, T, -1, D), cos, sin)
        q_idx = _rope(attn.index_q_proj(h).view(1, T, G, Di), cos, sin)
        k_idx = _rope(attn.index_k_proj(h).view(1, T, 1, Di), cos, sin)
        chosen = select_blocks(q_idx, k_idx, block_size=Bk, topk=topk, local_blocks=options["local_blocks"],
                               cu_seqlens=cu)[0]  # [T, G, k], block ids counted from each document's start
        hits = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            rows = rows_all[(rows_all >= a) & (rows_all < b)]
            t = rows - a
            rows, t = rows[t // Bk >= topk], t[t // Bk >= topk]  # a real choice: more than k visible blocks
            if rows.numel() == 0:
                continue
            L = b - a
            s = torch.einsum("pgrd,jgd->pgrj", q[0, rows].double().view(-1, G, R, D), k[0, a:b].double())
            s = s * attn.scaling
            s = s.masked_fill(torch.arange(L, device=s.device) > t[:, None, None, None], float("-inf"))
            mass = torch.softmax(s, -1).mean(2)  # [P, G, L]
            nblk = math.ceil(L / Bk)
            mass = F.pad(mass, (0, nblk * Bk - L)).view(*mass.shape[:2], nblk, Bk).sum(-1)
            local = (t // Bk)[:, None, None].expand(-1, G, 1)
            mass.scatter_(-1, local, -1.0)  # the local block is forced, not ranked
            top = mass.topk(topk - 1, dim=-1).indices  # [P, G, k-1], all visible (nonzero mass) and non-local
            picked = chosen[rows].long()  # [P, G, k]
            hits.append((top[..., :, None] == picked[..., None, :]).any(-1).flatten().float())
        if hits:
            recalls.append(torch.cat(hits).mean().item())
    return sum(recalls) / len(recalls) if recalls else float("nan")


@torch.no_grad()
def evaluate(model, batch: dict, args, converted: bool) -> dict:
    """Answer accuracy of ``model``'s weights in dense (warmup) and in sparse mode, and the indexer's recall (of a
    converted copy before the conversion)."""
    from msa_tl.integrations.transformers import set_msa_mode

    probe = model if converted else convert(copy.deepcopy(model), args)
    training, mode = probe.training, probe.config.msa["mode"]
    probe.eval()  # no KL loss
    set_msa_mode(probe, "warmup")
    captured = [{} for _ in attention_layers(probe)]

    def keep(store):
        def hook(module, args_, kwargs):
            store["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args_[0]
            store["position_embeddings"] = kwargs["position_embeddings"] if "position_embeddings" in kwargs \
                else args_[1]
        return hook

    hooks = [attn.register_forward_pre_hook(keep(store), with_kwargs=True)
             for attn, store in zip(attention_layers(probe), captured)]
    try:
        dense = answer_loss_and_accuracy(forward(probe, batch), batch["labels"])[1]
    finally:
        for handle in hooks:
            handle.remove()
    recall = teacher_recall(probe, captured, batch)
    set_msa_mode(probe, "sparse")
    sparse = answer_loss_and_accuracy(forward(probe, batch), batch["labels"])[1]
    set_msa_mode(probe, mode)
    probe.train(training)
    return dict(dense_accuracy=dense, sparse_accuracy=sparse, recall=recall)


# --------------------------------------------------------------------------------------------- training


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="packed tokens a step (one row)")
    parser.add_argument("--min-doc", type=int, default=256, help="shortest document")
    parser.add_argument("--max-doc", type=int, default=4096, help="longest document")
    parser.add_argument("--pairs", type=int, default=8, help="needles a document (fewer in short ones: (L - 1) // 4)")
    parser.add_argument("--keys", type=int, default=64, help="key tokens (a row's documents share 2 --pairs of them)")
    parser.add_argument("--vocab", type=int, default=1024, help="BOS + keys + values + filler tokens")
    parser.add_argument("--dense-steps", type=int, default=1500)
    parser.add_argument("--dense-doc-start", type=int, default=32,
                        help="the dense phase's longest document starts at this and doubles up to --max-doc (a "
                             "curriculum; from chance, recall forms only on short documents)")
    parser.add_argument("--steps", type=int, default=300, help="steps of the warmup and of the sparse phase")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 --hidden)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--index-head-dim", type=int, default=None, help="default --head-dim")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--index-lr", type=float, default=None, help="the index projections' (default --lr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-root", default=None)
    parser.add_argument("--plot", metavar="CSV", default=None, help="only draw the figure of a finished run")
    args = parser.parse_args(argv)
    if not 9 <= args.min_doc <= min(args.max_doc, args.seq):
        parser.error("need 9 <= --min-doc <= --max-doc and --min-doc <= --seq (a document holds a BOS, filler, a "
                     "needle and its query)")
    if args.dense_doc_start < 16:
        parser.error("--dense-doc-start must be at least 16 (its documents are half as long, and need 9 tokens)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        return plot(args.plot)
    from msa_tl.integrations.transformers import kl_losses, set_msa_mode

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shortest = curriculum(0, args.dense_steps, args.dense_doc_start, args.min_doc, args.max_doc)[0]
    values = max(args.keys, args.seq // shortest + 1)  # a shared key's values differ in every document
    if args.vocab < 1 + args.keys + values + 16:
        raise SystemExit(f"--vocab {args.vocab} leaves too few filler tokens after BOS, {args.keys} keys and "
                         f"{values} values")
    data = dict(seq=args.seq, min_doc=args.min_doc, max_doc=args.max_doc, pairs=args.pairs, keys=args.keys,
                values=values, vocab=args.vocab)
    torch.manual_seed(args.seed)
    model = build_model(args, args.vocab, device, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    eval_batch = to_device(make_packed_batch(**data, generator=torch.Generator().manual_seed(args.seed + 1)), device)
    table = BenchTable("packed_llama_training")
    setup = dict(seq=args.seq, min_doc=args.min_doc, max_doc=args.max_doc, pairs=args.pairs, layers=args.layers,
                 hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                 index_head_dim=args.index_head_dim or args.head_dim, block_size=args.block_size, topk=args.topk,
                 eval_docs=len(eval_batch["cu_seq_lens_q"]) - 1)
    print(f"Llama {args.layers}x{args.hidden}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.seq} packed tokens a step on {device} ({dtype}); evaluation row: {setup['eval_docs']} documents",
          flush=True)
    start, path = time.perf_counter(), None
    for phase in ("dense", "warmup", "sparse"):
        if phase == "warmup":
            convert(model, args)
            index = index_parameters(model)
            optimizer.add_param_group(dict(params=index, lr=args.index_lr or args.lr))
            print(f"converted to MSA (warmup): {sum(p.numel() for p in index)} index parameters", flush=True)
        elif phase == "sparse":
            set_msa_mode(model, "sparse")
        steps = args.dense_steps if phase == "dense" else args.steps
        for step in range(steps):
            lengths = dict(min_doc=args.min_doc, max_doc=args.max_doc)
            if phase == "dense":
                lengths = dict(zip(("min_doc", "max_doc"), curriculum(step, steps, args.dense_doc_start, args.min_doc,
                                                                         args.max_doc)))
            batch = to_device(make_packed_batch(**{**data, **lengths}, generator=generator), device)
            logits = forward(model, batch)
            lm_loss, accuracy = answer_loss_and_accuracy(logits, batch["labels"])
            kl = torch.zeros((), device=device)
            if phase != "dense":  # no MSA layers yet in the dense phase
                kl = kl + sum(kl_losses(model))
            optimizer.zero_grad(set_to_none=True)
            (lm_loss + kl).backward()
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)  # the LM's (the KL's alone)
            optimizer.step()
            if step % args.eval_every == 0 or step == steps - 1:
                row = evaluate(model, eval_batch, args, converted=phase != "dense")
                elapsed = time.perf_counter() - start
                table.add(**setup, phase=phase, step=step, docs=len(batch["cu_seq_lens_q"]) - 1,
                          longest_doc=batch["max_length_q"],
                          lm_loss=lm_loss.item(), kl_loss=kl.item(), train_accuracy=accuracy, **row,
                          seconds=round(elapsed, 1))
                print(f"[{elapsed:7.1f}s] {phase:<6} step {step:5d}  docs {len(batch['cu_seq_lens_q']) - 1:3d} "
                      f"(<= {batch['max_length_q']:5d})  lm {lm_loss.item():.3f}  kl {kl.item():.4f}  "
                      f"acc {accuracy:.2f}  | eval: dense {row['dense_accuracy']:.2f}  "
                      f"sparse {row['sparse_accuracy']:.2f}  recall {row['recall']:.2f}", flush=True)
                path = table.write_csv(args.results_root)  # a cut run keeps its rows
    print("wrote", path)
    return 0


def plot(csv_path) -> int:
    import pandas as pd

    from benchmarks.phase_plot import plot_phases

    frame = pd.read_csv(csv_path)
    ends = frame.groupby("phase", sort=False).step.max() + 1  # each phase's steps, in order
    frame["t"] = frame.step + frame.phase.map(ends.cumsum() - ends)  # the step counted from the run's start

    def loss_panel(ax, part, color, phase):
        ax.plot(part.t, part.lm_loss, "o-", color=color, label=f"{phase}: LM")
        if phase != "dense":  # the dense phase has no index branch, hence no KL
            ax.plot(part.t, part.kl_loss, "x--", color=color, label=f"{phase}: KL")

    setup = frame.iloc[0]
    plot_phases(frame, csv_path, loss_panel,
                ("loss (LM: answers; KL: warmup all visible tokens, sparse the chosen)",
                 "recall of the teacher's top blocks (dense phase: untrained indexer)", "answer accuracy (eval row)"),
                "training step",
                f"Packed Llama {setup.layers}x{setup.hidden}, {setup.seq} tokens of documents {setup.min_doc}-"
                f"{setup.max_doc}, Bk={setup.block_size}, k={setup.topk} ({setup.gpu}, {setup.date})", log_loss=True)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
