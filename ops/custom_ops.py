"""The MSA stages as ``torch.library`` custom ops with autograd, so ``torch.compile`` traces them whole.

    msa_tl::select_blocks(q_idx, k_idx, block_size, topk, index_scale, local_blocks, block_start?, index_fp8,
                          query_start) -> indices                                         no gradient
    msa_tl::sparse_attention(q, k, v, indices, block_size, scale, query_start) -> (o, lse)  grads: q, k, v
    msa_tl::sparse_attention_backward(do, dlse, q, k, v, indices, o, lse, ...) -> (dq, dk, dv)
    msa_tl::kl_alignment_loss(q, k, q_idx, k_idx, indices?, lse?, ..., with_grads, query_start)
        -> (loss, lse_student, dq_idx, dk_idx)
        grads: q_idx, k_idx (with_grads: the forward's own, scaled by the backward)
    msa_tl::kl_alignment_loss_backward(dloss, q, k, q_idx, k_idx, indices?, lse?, lse_student, ...)
        -> (dq_idx, dk_idx)

Shapes as in :mod:`msa_tl.reference`, ``query_start`` too (queries at an offset into their keys). Inputs arrive validated, with every scale resolved to a float
(:mod:`msa_tl.ops.functional` does both). Each body runs the stage's TileLang kernel where one is
registered for the device and shape (:mod:`msa_tl.ops.dispatch`). Otherwise it runs the float64
reference and casts the result to the input dtype. LSE stays float32, and so does the loss, except
float64 for float64 inputs. The KL op's ``lse`` is the main branch's lse over the same selection when the
caller has it (the kernels then skip recomputing it; the reference ignores it), and its ``lse_student``
[B, N, G] is the index branch's normaliser, kept for the backward. The KL op gives
no gradient to q and k (the teacher is detached), and the attention op none to the indices: the LM
loss never reaches the index projections, and the KL loss reaches nothing else.
"""

from typing import Optional

import torch
from torch import Tensor

from msa_tl import reference
from msa_tl.ops.dispatch import kernel_for


@torch.library.custom_op("msa_tl::select_blocks", mutates_args=())
def select_blocks_op(q_idx: Tensor, k_idx: Tensor, block_size: int, topk: int, index_scale: float,
                     local_blocks: int = 1, block_start: Optional[Tensor] = None, index_fp8: bool = False,
                     query_start: int = 0) -> Tensor:
    kernel = kernel_for("select_blocks", q_idx.device, dtype=q_idx.dtype, groups=q_idx.shape[2],
                        index_dim=q_idx.shape[3], block_size=block_size, topk=topk, index_fp8=index_fp8,
                        query_start=query_start)
    if kernel is not None:
        return kernel(q_idx, k_idx, block_size=block_size, topk=topk, index_scale=index_scale,
                      local_blocks=local_blocks, block_start=block_start, index_fp8=index_fp8,
                      query_start=query_start)
    if index_fp8:  # the values FP8 scoring sees: each row quantised to e4m3 with its own scale
        q_idx, k_idx = reference.fake_quantize_fp8(q_idx), reference.fake_quantize_fp8(k_idx)
    return reference.select_blocks(q_idx, k_idx, block_size, topk, index_scale, local_blocks, block_start,
                                   query_start)


@select_blocks_op.register_fake
def _(q_idx, k_idx, block_size, topk, index_scale, local_blocks=1, block_start=None, index_fp8=False,
      query_start=0):
    B, N, G, _ = q_idx.shape
    return q_idx.new_empty((B, N, G, topk), dtype=torch.int32)


@torch.library.custom_op("msa_tl::sparse_attention", mutates_args=())
def sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, block_size: int,
                        scale: float, query_start: int = 0) -> tuple[Tensor, Tensor]:
    kernel = kernel_for("sparse_attention", q.device, dtype=q.dtype, heads=q.shape[2], groups=k.shape[2],
                        head_dim=q.shape[3], block_size=block_size, topk=indices.shape[3], query_start=query_start)
    if kernel is not None:
        return kernel(q, k, v, indices, block_size=block_size, scale=scale, query_start=query_start)
    o, lse = reference.sparse_attention(q, k, v, indices, block_size, scale, query_start)
    return o.to(q.dtype), lse.float()


@sparse_attention_op.register_fake
def _(q, k, v, indices, block_size, scale, query_start=0):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("msa_tl::sparse_attention_backward", mutates_args=())
def sparse_attention_backward_op(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                                 indices: Tensor, o: Tensor, lse: Tensor, block_size: int,
                                 scale: float, query_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    kernel = kernel_for("sparse_attention_backward", q.device, dtype=q.dtype, heads=q.shape[2], groups=k.shape[2],
                        head_dim=q.shape[3], block_size=block_size, topk=indices.shape[3], query_start=query_start)
    if kernel is not None:
        return kernel(do, dlse, q, k, v, indices, o, lse, block_size=block_size, scale=scale,
                      query_start=query_start)
    dq, dk, dv = reference.sparse_attention_backward(do, dlse, q, k, v, indices, block_size, scale, query_start)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@sparse_attention_backward_op.register_fake
def _(do, dlse, q, k, v, indices, o, lse, block_size, scale, query_start=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, indices, block_size, scale, query_start = inputs
    ctx.save_for_backward(q, k, v, indices, *output)
    ctx.block_size, ctx.scale, ctx.query_start = block_size, scale, query_start


def _attention_backward(ctx, do, dlse):
    q, k, v, indices, o, lse = ctx.saved_tensors
    dq, dk, dv = sparse_attention_backward_op(do.contiguous(), None if dlse is None else dlse.contiguous(),
                                              q, k, v, indices, o, lse, ctx.block_size, ctx.scale, ctx.query_start)
    return dq, dk, dv, None, None, None, None


sparse_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _loss_dtype(q_idx: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (so gradcheck sees the reference's precision)."""
    return torch.promote_types(torch.float32, q_idx.dtype)


@torch.library.custom_op("msa_tl::kl_alignment_loss", mutates_args=())
def kl_alignment_loss_op(q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor, indices: Optional[Tensor],
                         lse: Optional[Tensor], block_size: int, scale: float, index_scale: float,
                         with_grads: bool = False, query_start: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse_student, dq_idx, dk_idx): with ``with_grads`` the last two are the loss's own gradients
    (float32, computed by the same pass), which the backward scales; otherwise they are empty."""
    kernel = kernel_for("kl_alignment_loss", q.device, **_kl_shape(q, k, q_idx, indices, block_size, query_start))
    if kernel is not None:
        out = kernel(q, k, q_idx, k_idx, indices, lse, block_size=block_size, scale=scale, index_scale=index_scale,
                     with_grads=with_grads, query_start=query_start)
        return out if with_grads else (*out, q_idx.new_empty(0, dtype=torch.float32),
                                       k_idx.new_empty(0, dtype=torch.float32))
    loss, lse_student = reference.kl_alignment_loss(q, k, q_idx, k_idx, indices, block_size, scale, index_scale,
                                                    return_student_lse=True, lse=lse, query_start=query_start)
    dtype = _loss_dtype(q_idx)
    if with_grads:
        dq_idx, dk_idx = reference.kl_alignment_loss_backward(1.0, q, k, q_idx, k_idx, indices, block_size, scale,
                                                              index_scale, lse=lse, query_start=query_start)
        dq_idx, dk_idx = dq_idx.to(dtype), dk_idx.to(dtype)
    else:
        dq_idx, dk_idx = q_idx.new_empty(0, dtype=dtype), k_idx.new_empty(0, dtype=dtype)
    return loss.to(dtype), lse_student.to(dtype), dq_idx, dk_idx


def _kl_shape(q, k, q_idx, indices, block_size, query_start):
    return dict(dtype=q.dtype, batch=q.shape[0], seq=k.shape[1], heads=q.shape[2], groups=k.shape[2],
                head_dim=q.shape[3], index_dim=q_idx.shape[3], block_size=block_size, sparse=indices is not None,
                query_start=query_start)


@kl_alignment_loss_op.register_fake
def _(q, k, q_idx, k_idx, indices, lse, block_size, scale, index_scale, with_grads=False, query_start=0):
    B, N, G, _ = q_idx.shape
    dtype = _loss_dtype(q_idx)
    grads = ((q_idx.new_empty(q_idx.shape, dtype=dtype), k_idx.new_empty(k_idx.shape, dtype=dtype)) if with_grads
             else (q_idx.new_empty(0, dtype=dtype), k_idx.new_empty(0, dtype=dtype)))
    return q.new_empty((), dtype=dtype), q.new_empty((B, N, G), dtype=dtype), *grads


@torch.library.custom_op("msa_tl::kl_alignment_loss_backward", mutates_args=())
def kl_alignment_loss_backward_op(dloss: Tensor, q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor,
                                  indices: Optional[Tensor], lse: Optional[Tensor], lse_student: Tensor,
                                  block_size: int, scale: float, index_scale: float,
                                  query_start: int = 0) -> tuple[Tensor, Tensor]:
    kernel = kernel_for("kl_alignment_loss_backward", q.device,
                        **_kl_shape(q, k, q_idx, indices, block_size, query_start))
    if kernel is not None:
        return kernel(dloss, q, k, q_idx, k_idx, indices, lse, lse_student, block_size=block_size, scale=scale,
                      index_scale=index_scale, query_start=query_start)
    dq_idx, dk_idx = reference.kl_alignment_loss_backward(dloss, q, k, q_idx, k_idx, indices, block_size, scale,
                                                          index_scale, lse=lse, query_start=query_start)
    return dq_idx.to(q_idx.dtype), dk_idx.to(k_idx.dtype)


@kl_alignment_loss_backward_op.register_fake
def _(dloss, q, k, q_idx, k_idx, indices, lse, lse_student, block_size, scale, index_scale, query_start=0):
    return torch.empty_like(q_idx), torch.empty_like(k_idx)


def _kl_setup(ctx, inputs, output):
    q, k, q_idx, k_idx, indices, lse, block_size, scale, index_scale, with_grads, query_start = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(q, k, q_idx, k_idx, indices, lse, *output[1:])
    ctx.options = (block_size, scale, index_scale, query_start)


def _kl_backward(ctx, dloss, _dlse_student, _ddq, _ddk):
    q, k, q_idx, k_idx, indices, lse, lse_student, dq_unit, dk_unit = ctx.saved_tensors
    if dq_unit.numel():  # the forward's pass computed the gradients of the loss itself
        dq_idx, dk_idx = (dloss * dq_unit).to(q_idx.dtype), (dloss * dk_unit).to(k_idx.dtype)
    else:
        dq_idx, dk_idx = kl_alignment_loss_backward_op(dloss, q, k, q_idx, k_idx, indices, lse, lse_student,
                                                       *ctx.options)
    return None, None, dq_idx, dk_idx, None, None, None, None, None, None, None  # the teacher (q, k, lse) is detached


kl_alignment_loss_op.register_autograd(_kl_backward, setup_context=_kl_setup)
