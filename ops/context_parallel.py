"""Context parallelism: one sequence split over the ranks of a ``torch.distributed`` process group.

Layout (zigzag, as ring attention balances causal work): the N tokens are cut into 2P chunks of C = N / (2P)
tokens, C a multiple of the block size; rank r holds chunks r and 2P - 1 - r back to back as its local tensors
``x [B, 2C, ...]`` (:class:`ZigzagLayout`). The positions of a rank's two chunks sum to the same on every rank,
and so does its causal work.

One forward (:func:`context_parallel_msa`), on every rank:

1. the index keys are all-gathered (N * Di values: 256 MB at 1M tokens, Di = 128, bf16);
2. each local chunk selects its blocks against the keys before it (``select_blocks(..., query_start=t0)``);
3. the K / V blocks the rank's queries chose on other ranks are fetched: an all-to-all of just those blocks, or an
   all-gather of K / V where nearly every block is chosen by someone (long sequences over few ranks);
4. each chunk attends over its blocks (``sparse_attention(..., query_start=t0)``) and, when asked, computes its KL
   alignment loss against the same keys (it needs nothing from other ranks beyond steps 1 and 3).

Backward: the gradients of fetched K / V blocks go back to their owners (the reverse all-to-all, or a
reduce-scatter after an all-gather), and the index keys' KL gradients are reduce-scattered the same way.

Losses: a rank's ``kl_loss`` is the mean over its own queries, so the mean over the ranks is the whole sequence's
loss. Each rank back-propagates its own losses (as in Megatron-LM's context parallelism); the parameter gradients
summed over the ranks are then those of the losses summed over the ranks: all-reduce them over the group (with the
data-parallel gradients), averaging for the mean.

    q        [B, 2C, Hq, D]    the rank's queries (chunk r, then chunk 2P - 1 - r)
    k, v     [B, 2C, G, D]
    q_idx    [B, 2C, G, Di]
    k_idx    [B, 2C, Di]
    o        [B, 2C, Hq, D];  lse [B, 2C, Hq];  indices [B, 2C, G, topk] (global block ids)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from msa_tl.ops.functional import _default_scale, _kl_alignment_loss, _sparse_attention, select_blocks
from msa_tl.ops.validation import check_attention_inputs, check_index_inputs, check_options
from msa_tl.ops.varlen import dense_packed, varlen_lse_available

KV_EXCHANGES = ("auto", "all_gather", "chosen")
# "auto" fetches the chosen blocks unless they are more than this share of what an all-gather of K / V moves:
# an all-gather is one bandwidth-optimal collective, an all-to-all of nearly everything costs more for no saving.
ALL_GATHER_SHARE = 0.75

# torch 2.13 renamed the single-tensor collectives (the old names warn)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class ZigzagLayout:
    """Where the tokens of a ``seq_len`` sequence live over ``world_size`` ranks (module docstring).

    ``chunk`` C = seq_len / (2 * world_size) tokens, a multiple of ``block_size``, so no key block spans two ranks.
    """

    seq_len: int
    world_size: int
    rank: int
    block_size: int

    def __post_init__(self):
        parts = 2 * self.world_size
        if self.seq_len % (parts * self.block_size):
            raise ValueError(f"context parallelism over {self.world_size} ranks cuts the sequence into {parts} chunks "
                             f"of whole {self.block_size}-token blocks: seq_len {self.seq_len} must be a multiple of "
                             f"{parts * self.block_size} (pad the sequence)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.world_size}")

    @property
    def chunk(self) -> int:
        return self.seq_len // (2 * self.world_size)

    def chunk_ids(self, rank: int | None = None) -> tuple[int, int]:
        """The two chunks a rank holds, in its local order."""
        rank = self.rank if rank is None else rank
        return rank, 2 * self.world_size - 1 - rank

    def chunk_starts(self, rank: int | None = None) -> tuple[int, int]:
        """The positions of the first tokens of a rank's two chunks."""
        return tuple(c * self.chunk for c in self.chunk_ids(rank))

    def positions(self, device=None) -> torch.Tensor:
        """[2C] int64: the position in the sequence of each of the rank's tokens (for its rotary embedding)."""
        return torch.cat([torch.arange(t0, t0 + self.chunk, device=device) for t0 in self.chunk_starts()])

    def shard(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """The rank's tokens of a whole sequence x [B, N, ...]: [B, 2C, ...], contiguous."""
        C = self.chunk
        return torch.cat([x[:, t0:t0 + C] for t0 in self.chunk_starts(rank)], dim=1)

    def unshard(self, shards) -> torch.Tensor:
        """The whole sequence [B, N, ...] from every rank's shard [B, 2C, ...] (a sequence indexed by rank)."""
        C, P = self.chunk, self.world_size
        pieces = [shards[c if c < P else 2 * P - 1 - c][:, (0 if c < P else C):(C if c < P else 2 * C)]
                  for c in range(2 * P)]
        return torch.cat(pieces, dim=1)

    def block_owners(self, device=None) -> torch.Tensor:
        """[nblk] int64: the rank that holds each key block."""
        P, per_chunk = self.world_size, self.chunk // self.block_size
        chunk = torch.arange(2 * P, device=device).repeat_interleave(per_chunk)
        return torch.where(chunk < P, chunk, 2 * P - 1 - chunk)

    def local_blocks(self, rank: int | None = None, device=None) -> torch.Tensor:
        """[2C / Bk] int64: the global ids of a rank's blocks, in its local order."""
        per_chunk = self.chunk // self.block_size
        return torch.cat([torch.arange(c * per_chunk, (c + 1) * per_chunk, device=device)
                          for c in self.chunk_ids(rank)])


def zigzag_layout(local_len: int, block_size: int, process_group=None) -> ZigzagLayout:
    """The layout of a sequence whose shards hold ``local_len`` tokens on each rank of ``process_group``."""
    P = dist.get_world_size(process_group)
    return ZigzagLayout(local_len * P, P, dist.get_rank(process_group), block_size)


class PendingGather(NamedTuple):
    """An all-gather of the ranks' shards under way (:func:`start_gather`)."""

    parts: torch.Tensor
    work: object


def start_gather(x: torch.Tensor, layout: ZigzagLayout, process_group=None) -> PendingGather:
    """Start gathering every rank's shard x [B, 2C, ...] (asynchronously: on the GPU, NCCL's stream runs it while
    the rank computes); :func:`gather_sequence` with ``pending`` finishes it."""
    x = x.detach().contiguous()
    parts = x.new_empty((layout.world_size * x.shape[0], *x.shape[1:]))  # the ranks' shards along dim 0
    return PendingGather(parts, _all_gather(parts, x, group=process_group, async_op=True))


class _GatherSequence(torch.autograd.Function):
    """Every rank's shard [B, 2C, ...] -> the whole sequence [B, N, ...]; backward: each rank gets the sum over the
    ranks of its tokens' gradients (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, layout: ZigzagLayout, group, pending):
        ctx.layout, ctx.group = layout, group
        pending = pending or start_gather(x, layout, group)
        pending.work.wait()
        return layout.unshard(pending.parts.view(layout.world_size, *x.shape))

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        per_rank = torch.cat([layout.shard(grad, r) for r in range(layout.world_size)])  # [P * B, 2C, ...]
        out = grad.new_empty((grad.shape[0], *per_rank.shape[1:]))
        _reduce_scatter(out, per_rank, group=ctx.group)
        return out, None, None, None


def gather_sequence(x: torch.Tensor, layout: ZigzagLayout, process_group=None,
                    pending: PendingGather | None = None) -> torch.Tensor:
    """The whole sequence [B, N, ...] from the ranks' shards x [B, 2C, ...], differentiable (module docstring);
    ``pending``: the same gather begun by :func:`start_gather`."""
    return _GatherSequence.apply(x, layout, process_group, pending)


class BlockExchange(NamedTuple):
    """Which K / V blocks move between the ranks: ``sends[r]`` (this rank's block ids another rank ``r`` chose),
    ``receives[r]`` (rank r's block ids this rank chose), ascending; None for an all-gather of every block."""

    sends: list | None
    receives: list | None


def plan_exchange(indices: torch.Tensor, layout: ZigzagLayout, process_group=None,
                  kv_exchange: str = "auto") -> BlockExchange:
    """The K / V blocks each rank needs, from its indices [B, 2C, G, topk] (global block ids, -1 unused).

    The ranks all-gather which blocks each chose (a bool per block, so all of them plan the same exchange); with
    ``kv_exchange="auto"`` an exchange that would move more than ``ALL_GATHER_SHARE`` of an all-gather's blocks
    becomes the all-gather.
    """
    if kv_exchange not in KV_EXCHANGES:
        raise ValueError(f"kv_exchange must be one of {KV_EXCHANGES}, got {kv_exchange!r}")
    if kv_exchange == "all_gather":
        return BlockExchange(None, None)
    P, nblk = layout.world_size, layout.seq_len // layout.block_size
    chosen = torch.zeros(nblk + 1, dtype=torch.uint8, device=indices.device)
    chosen[torch.where((indices >= 0) & (indices < nblk), indices, nblk).reshape(-1).long()] = 1
    every = chosen.new_empty(P * nblk)
    _all_gather(every, chosen[:nblk].contiguous(), group=process_group)
    every = every.view(P, nblk)
    owners = layout.block_owners(indices.device)
    remote = every.bool() & (owners[None, :] != torch.arange(P, device=indices.device)[:, None])  # [P, nblk]
    if kv_exchange == "auto" and int(remote.sum()) > ALL_GATHER_SHARE * (P - 1) * nblk:
        return BlockExchange(None, None)
    me = layout.rank
    ids = torch.arange(nblk, device=indices.device)
    sends = [ids[remote[r] & (owners == me)] for r in range(P)]
    receives = [ids[remote[me] & (owners == r)] for r in range(P)]
    return BlockExchange(sends, receives)


def _as_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [B, T, ...] -> [T / Bk, B, Bk, ...]: one row per key block."""
    B, T = x.shape[:2]
    return x.reshape(B, T // block_size, block_size, *x.shape[2:]).transpose(0, 1)


def _from_blocks(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_as_blocks`, contiguous."""
    n, B, Bk = x.shape[:3]
    return x.transpose(0, 1).reshape(B, n * Bk, *x.shape[3:])


def _all_to_all_blocks(send_rows: list, recv_counts: list, like: torch.Tensor, group) -> torch.Tensor:
    """Block rows [n_r, B, Bk, ...] to each rank r -> the rows every rank sent here, in rank order."""
    send = torch.cat(send_rows) if send_rows else like.new_empty((0, *like.shape[1:]))
    recv = like.new_empty((sum(recv_counts), *like.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=list(recv_counts),
                           input_split_sizes=[len(rows) for rows in send_rows], group=group)
    return recv


class _FetchBlocks(torch.autograd.Function):
    """The rank's K / V shard kv [B, 2C, G, 2D] -> kv over the whole sequence [B, N, G, 2D]: its own blocks and the
    remote blocks it chose (zeros elsewhere: no query here reads them). Backward: the gradients of the fetched
    blocks return to their owners and are added to theirs."""

    @staticmethod
    def forward(ctx, kv, layout: ZigzagLayout, exchange: BlockExchange, group):
        ctx.layout, ctx.exchange, ctx.group = layout, exchange, group
        Bk = layout.block_size
        own = layout.local_blocks(device=kv.device)
        local = _as_blocks(kv, Bk)  # [2C / Bk, B, Bk, G, 2D]
        position = torch.empty(layout.seq_len // Bk, dtype=torch.long, device=kv.device)
        position[own] = torch.arange(len(own), device=kv.device)  # a block id -> its row in the shard
        ctx.position = position
        recv = _all_to_all_blocks([local[position[ids]] for ids in exchange.sends],
                                  [len(ids) for ids in exchange.receives], local, group)
        whole = local.new_zeros((layout.seq_len // Bk, *local.shape[1:]))
        whole[own] = local
        whole[torch.cat(exchange.receives)] = recv
        return _from_blocks(whole)

    @staticmethod
    def backward(ctx, grad):
        layout, exchange = ctx.layout, ctx.exchange
        blocks = _as_blocks(grad, layout.block_size)  # [nblk, B, Bk, G, 2D]
        own = layout.local_blocks(device=grad.device)
        back = _all_to_all_blocks([blocks[ids] for ids in exchange.receives], [len(ids) for ids in exchange.sends],
                                  blocks, ctx.group)
        local = blocks[own].clone()
        if back.shape[0]:
            local.index_add_(0, ctx.position[torch.cat(exchange.sends)], back)
        return _from_blocks(local), None, None, None


def fetch_kv(k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout, exchange: BlockExchange,
             process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, 2C, G, D] shards -> [B, N, G, D] each over the whole sequence, as ``exchange`` plans
    (:func:`plan_exchange`); differentiable."""
    whole = fetch_packed_kv(torch.cat([k, v], dim=-1), layout, exchange, process_group)
    return whole[..., :k.shape[-1]], whole[..., k.shape[-1]:]


def fetch_packed_kv(kv: torch.Tensor, layout: ZigzagLayout, exchange: BlockExchange, process_group=None,
                    pending: PendingGather | None = None) -> torch.Tensor:
    """:func:`fetch_kv` of K and V packed as one tensor kv [B, 2C, G, 2D] (one collective for both) -> [B, N, G, 2D].
    ``pending``: the all-gather of this very ``kv`` begun by :func:`start_gather`, for an all-gather exchange."""
    if exchange.sends is None:
        return gather_sequence(kv, layout, process_group, pending)
    return _FetchBlocks.apply(kv, layout, exchange, process_group)


class CommunicationVolume(NamedTuple):
    """Bytes one rank received in a forward (its backward sends as many back): ``index_keys`` (the all-gather of
    k_idx), ``kv`` (the K / V blocks fetched), ``kv_path`` ("chosen" or "all_gather"), and ``dense_kv``: what dense
    context parallelism receives for the same sequence (the K / V of every other rank)."""

    index_keys: int
    kv: int
    kv_path: str
    dense_kv: int


def _volume(layout: ZigzagLayout, exchange: BlockExchange, k: torch.Tensor, k_idx: torch.Tensor) -> CommunicationVolume:
    others = layout.seq_len - 2 * layout.chunk  # tokens held by other ranks
    per_token_kv = 2 * k.shape[0] * k.shape[2] * k.shape[3] * k.element_size()
    dense = others * per_token_kv
    if exchange.sends is None:
        kv, path = dense, "all_gather"
    else:
        kv, path = sum(len(ids) for ids in exchange.receives) * layout.block_size * per_token_kv, "chosen"
    index = others * k_idx.shape[0] * k_idx.shape[2] * k_idx.element_size()
    return CommunicationVolume(index, kv, path, dense)


class ContextParallelOutput(NamedTuple):
    """The rank's results: o [B, 2C, Hq, D]; lse [B, 2C, Hq] float32 (None in dense mode without a kernel lse);
    indices [B, 2C, G, topk] (None in dense mode); kl_loss (None unless asked); volume (:class:`CommunicationVolume`)."""

    o: torch.Tensor
    lse: torch.Tensor | None
    indices: torch.Tensor | None
    kl_loss: torch.Tensor | None
    volume: CommunicationVolume


def context_parallel_msa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    *,
    process_group=None,
    block_size: int = 128,
    topk: int = 16,
    scale: float | None = None,
    index_scale: float | None = None,
    local_blocks: int = 1,
    index_fp8: bool = False,
    dense: bool = False,
    compute_kl: bool = False,
    kv_exchange: str = "auto",
) -> ContextParallelOutput:
    """MSA of one sequence sharded over ``process_group`` (default: the world), called by every rank with its shard.

    Args:
        q, k, v, q_idx, k_idx: the rank's tokens in the zigzag layout (module docstring; :class:`ZigzagLayout`
            shards a whole sequence). The sequence is 2C * world_size tokens, C a multiple of ``block_size``.
        block_size, topk, scale, index_scale, local_blocks, index_fp8: as in
            :func:`~msa_tl.ops.functional.msa_attention`.
        dense: dense causal attention instead of the selection (the layer's warmup); its KL is over every
            visible token.
        compute_kl: also the KL alignment loss of the rank's queries (their mean: module docstring).
        kv_exchange: ``"chosen"`` fetches the remote K / V blocks the rank's queries chose, ``"all_gather"``
            gathers all of K / V, ``"auto"`` the first unless it moves nearly as much (``ALL_GATHER_SHARE``). Dense
            mode always gathers.

    Returns:
        :class:`ContextParallelOutput`. Gradients reach q, k, v (from o and lse) and q_idx, k_idx (from kl_loss)
        on every rank, k / v / k_idx's through the other ranks' backward: every rank must run its backward.
    """
    check_options(block_size=block_size, topk=topk, local_blocks=local_blocks, scale=scale, index_scale=index_scale)
    check_attention_inputs(q, k, v)
    k_idx = check_index_inputs(q_idx, k_idx, batch=q.shape[0], seq=q.shape[1], groups=k.shape[2], like=q)
    if kv_exchange not in KV_EXCHANGES:
        raise ValueError(f"kv_exchange must be one of {KV_EXCHANGES}, got {kv_exchange!r}")
    if q.shape[1] % 2:
        raise ValueError(f"a rank holds two chunks of the sequence: its {q.shape[1]} tokens must be even")
    layout = zigzag_layout(q.shape[1], block_size, process_group)
    C = layout.chunk
    rows = [slice(0, C), slice(C, 2 * C)]
    starts = layout.chunk_starts()
    whole_k_idx = gather_sequence(k_idx, layout, process_group)
    kv = torch.cat([k, v], dim=-1)  # K and V move together
    # an all-gather of K / V needs no plan: it runs while the rank selects
    pending = start_gather(kv, layout, process_group) if dense or kv_exchange == "all_gather" else None

    def upto(x, t0):  # the tokens before a chunk's end: [B, t0 + C, ...]
        return x[:, :t0 + C].contiguous()

    def local(x, half):
        return x[:, rows[half]].contiguous()

    indices = None
    if dense:
        exchange = BlockExchange(None, None)
    else:
        with torch.no_grad():
            indices = [select_blocks(local(q_idx, h), upto(whole_k_idx.detach(), t0), block_size=block_size,
                                     topk=topk, index_scale=index_scale, local_blocks=local_blocks,
                                     index_fp8=index_fp8, query_start=t0)
                       for h, t0 in enumerate(starts)]
        exchange = plan_exchange(torch.cat(indices, dim=1), layout, process_group, kv_exchange)
    whole_kv = fetch_packed_kv(kv, layout, exchange, process_group, pending)
    whole_k, whole_v = whole_kv[..., :k.shape[-1]], whole_kv[..., k.shape[-1]:]

    outs, lses, losses = [], [], []
    for h, t0 in enumerate(starts):
        q_h, k_h, v_h = local(q, h), upto(whole_k, t0), upto(whole_v, t0)
        if dense:
            o_h, lse_h = _dense_chunk(q_h, k_h, v_h, scale, t0, with_lse=compute_kl)
        else:
            o_h, lse_h = _sparse_attention(q_h, k_h, v_h, indices[h], block_size, scale, True, t0)
        outs.append(o_h)
        lses.append(lse_h)
        if compute_kl:
            losses.append(_kl_alignment_loss(q_h, k_h, local(q_idx, h), upto(whole_k_idx, t0),
                                             None if dense else indices[h], block_size, scale, index_scale,
                                             lse_h, t0))
    lse = None if lses[0] is None else torch.cat(lses, dim=1)
    return ContextParallelOutput(torch.cat(outs, dim=1), lse, None if dense else torch.cat(indices, dim=1),
                                 torch.stack(losses).mean() if compute_kl else None,
                                 _volume(layout, exchange, k, k_idx))


def _dense_chunk(q, k, v, scale, query_start: int, with_lse: bool = False):
    """Dense causal GQA attention of the queries ``query_start ..`` q [B, C, Hq, D] over the keys before their end,
    k / v [B, query_start + C, G, D]: (o, lse or None). The lse comes only from FlashAttention's varlen kernel (a
    GPU); without it the KL computes the teacher's normaliser itself."""
    B, C, Hq, D = q.shape
    N = k.shape[1]
    cu_q = torch.arange(0, (B + 1) * C, C, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)
    as_row = dict(cu_seqlens_k=cu_k, max_seqlen_k=N)
    flat = (x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v))
    scale = _default_scale(scale, D)
    if with_lse and q.is_cuda and varlen_lse_available():
        o, lse = dense_packed(*flat, cu_q, C, scale, return_lse=True, **as_row)
        return o.view(B, C, Hq, D), lse.view(B, C, Hq)
    return dense_packed(*flat, cu_q, C, scale, **as_row).view(B, C, Hq, D), None


__all__ = [
    "ZigzagLayout",
    "zigzag_layout",
    "start_gather",
    "gather_sequence",
    "plan_exchange",
    "fetch_kv",
    "fetch_packed_kv",
    "BlockExchange",
    "CommunicationVolume",
    "ContextParallelOutput",
    "context_parallel_msa",
]
