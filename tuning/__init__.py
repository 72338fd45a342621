"""The autotuner, one module per part.

- ``programs``: the registry of tunable programs. Each kernel module declares its programs'
  :class:`~msa_tl.tunable.TunableProgram` (dims, defaults, knob grid, constraints, compile units, GPU trial)
  beside the kernel; the other parts read them from here.
- ``spaces``: constraint-checked search spaces for every TileLang program.
- ``objective``: the cost of a trial, either checked against the reference and then timed on the
  GPU, or lowering time on the CPU.
- ``search``: resumable SQLite Optuna studies, run in batches with parallel CPU compiles.
- ``cache``: JSON winners, looked up user -> shipped -> default. Every kernel calls ``tuned_config``.
- ``tune``: ``msa-tl tune``.
Tuned configs that ship with the package live in ``configs/*.json``.
"""
