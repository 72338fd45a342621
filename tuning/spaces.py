"""Search spaces of the TileLang programs, with constraints that reject impossible configs before compiling.

Each program has a grid of choices (``SPACES[program].params``) and a ``reject(config, shape)`` that returns why
a config cannot work on Hopper at that shape (shared memory over the per-block limit, accumulators over the
register file, tiles that break the kernel's layout assumptions), or None. Both are the program's
:class:`~msa_tl.tunable.TunableProgram`, declared beside its kernel (e.g. ``kv_outer.ATTENTION_TUNING``).
``shape`` holds the problem's dims: groups, heads, head_dim, index_dim, block_size, topk, seq.
"""

import itertools
from dataclasses import dataclass, field
from typing import Callable

from msa_tl.tl_compile import SMEM_LIMIT  # noqa: F401  (the limit the constraints check, for callers)
from msa_tl.tuning.programs import tunable_programs


@dataclass(frozen=True)
class Space:
    params: dict = field(default_factory=dict)  # name -> tuple of choices
    reject: Callable[[dict, dict], "str | None"] = lambda config, shape: None
    dims: tuple = ()  # the shape dims the program depends on (its cache key; seq is bucketed separately)

    def grid(self):
        names = list(self.params)
        for values in itertools.product(*(self.params[n] for n in names)):
            yield dict(zip(names, values))

    def feasible(self, shape: dict):
        """Every config of the grid that passes the constraints at ``shape``."""
        return [c for c in self.grid() if self.reject(c, shape) is None]


SPACES = {name: Space(p.knobs, p.reject, p.dims) for name, p in tunable_programs().items()}
