"""torch-facing MSA: the functional API, the trainable layer and the per-stage dispatch."""

from msa_tl.ops import kernels  # noqa: F401  (registers the TileLang kernels)
from msa_tl.ops.cache import MSACache
from msa_tl.ops.functional import kl_alignment_loss, msa_attention, msa_decode, select_blocks, sparse_attention
from msa_tl.ops.layer import MSAAttention, MSAOutput

__all__ = [
    "msa_attention",
    "msa_decode",
    "MSACache",
    "select_blocks",
    "sparse_attention",
    "kl_alignment_loss",
    "MSAAttention",
    "MSAOutput",
]
