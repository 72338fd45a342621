"""The autotuner: search spaces (``spaces``), the Optuna study runner (``search``) and the config cache (``cache``).

Built so far: constraint-checked search spaces for every TileLang program, a
JSON cache with user -> shipped -> default lookup, and resumable SQLite-backed
Optuna studies. Still to come: the GPU objective (check against the reference,
then time), the ``msa-tl tune`` command, the kernels reading the cache, and
shipped H100 configs.
"""
