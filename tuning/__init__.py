"""The Optuna autotuner for the TileLang programs (search spaces, study runner, config cache).

Filled by the autotuner issue; until then no program has tunable configs and
every kernel uses its documented defaults.
"""
