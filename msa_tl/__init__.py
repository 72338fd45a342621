"""msa-tl: MiniMax Sparse Attention (MSA) in TileLang for Hopper GPUs.

    from msa_tl import msa_attention, MSAAttention

``msa_tl.reference`` is the float64 oracle of every stage, ``msa_tl.ops`` the
torch API and layer, ``msa_tl.tuning`` the autotuner; the TileLang programs
live in ``msa_tl`` itself, one module per stage.
"""

__version__ = "0.1.0"

from msa_tl import ops  # noqa: E402
from msa_tl.ops import *  # noqa: E402,F401,F403  (the public API is msa_tl.ops.__all__)

__all__ = ["__version__", *ops.__all__]
