"""The autotuner, one module per part.

- ``spaces``: constraint-checked search spaces for every TileLang program, over the knob grids each kernel
  module declares beside its defaults.
- ``objective``: the cost of a trial, either checked against the reference and then timed on the
  GPU, or lowering time on the CPU.
- ``search``: resumable SQLite Optuna studies, run in batches with parallel CPU compiles.
- ``cache``: JSON winners, looked up user -> shipped -> default. Every kernel calls ``tuned_config``.
- ``tune``: ``msa-tl tune``.
Tuned configs that ship with the package live in ``configs/*.json``.
"""
