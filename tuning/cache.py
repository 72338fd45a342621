"""Tuned configs: JSON keyed by GPU (name and compute capability), program and shape bucket.

Lookup order: the user cache (``$MSA_TL_CACHE_DIR`` or ``~/.cache/msa_tl``,
file ``configs.json``), then the configs shipped in ``msa_tl/tuning/configs/*.json``; where neither holds the
call's sequence-length bucket, the config tuned for the nearest bucket of the same program, dims and GPU (user
before shipped on a tie); then the kernel's documented default. A corrupted or foreign file is ignored
with one warning. Writers take a file lock, merge into what is on disk, write a
temp file and rename it, so concurrent tuners lose no entries.
"""

import fcntl
import json
import logging
import math
import os
import tempfile
from pathlib import Path

logger = logging.getLogger("msa_tl")

FORMAT = "msa-tl-configs/1"
CACHE_ENV = "MSA_TL_CACHE_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"
SEQ_BUCKETS = (8192, 32768, 131072, 524288, 1 << 31)
_WARNED: set = set()


def _program_dims(program: str):
    """The dims of a tunable program's cache key, None for any other name."""
    # imported here: the kernel modules that declare the dims import this module for tuned_config
    from msa_tl.tuning.programs import PROGRAMS, tunable

    return tunable(program).dims if program in PROGRAMS else None


def __getattr__(name):
    if name == "PROGRAM_DIMS":  # program -> the shape dims it depends on: its cache key (seq is bucketed separately)
        from msa_tl.tuning.programs import PROGRAMS

        return {program: _program_dims(program) for program in PROGRAMS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "msa_tl")


def gpu_key(name: str, capability: str) -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)'."""
    return f"{name} (sm_{capability.replace('.', '')})"


def shape_key(program: str, shape: dict) -> str:
    """Program plus shape bucket: sequence length rounded up to a bucket, the program's other dims exact.

    A tunable program (:mod:`msa_tl.tuning.programs`) keys on its own dims only (the rest of ``shape`` is
    ignored); any other name keys on every dim it is given.
    """
    seq = shape.get("seq")
    bucket = next(b for b in SEQ_BUCKETS if seq is None or seq <= b)
    names = _program_dims(program) or sorted(k for k in shape if k != "seq")
    dims = ",".join(f"{k}={shape[k]}" for k in sorted(names))
    return f"{program}|seq<={bucket}|{dims}"


class ConfigCache:
    """One JSON file: {"format": FORMAT, "entries": {gpu_key: {shape_key: {"config": {...}, ...}}}}."""

    def __init__(self, path):
        self.path = Path(path)

    def load(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not an {FORMAT} file")
            return data["entries"]
        except (OSError, ValueError) as exc:
            if str(self.path) not in _WARNED:
                _WARNED.add(str(self.path))
                logger.warning("msa_tl: ignoring config cache %s (%s)", self.path, exc)
            return {}

    def get(self, gpu: str, key: str):
        entry = self.load().get(gpu, {}).get(key)
        return entry if isinstance(entry, dict) and isinstance(entry.get("config"), dict) else None

    def put(self, gpu: str, key: str, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.load()
            entries.setdefault(gpu, {})[key] = entry
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


def user_cache() -> ConfigCache:
    return ConfigCache(cache_dir() / "configs.json")


def shipped_caches() -> list:
    return [ConfigCache(p) for p in sorted(SHIPPED_DIR.glob("*.json"))]


def split_key(key: str) -> tuple:
    """A :func:`shape_key` -> (program, seq bucket, the other dims as written)."""
    program, bucket, dims = key.split("|", 2)
    return program, int(bucket.removeprefix("seq<=")), dims


def lookup(program: str, shape: dict, defaults: dict, gpu: str) -> tuple:
    """(config, source) for ``program`` at ``shape`` on ``gpu``: 'user', 'shipped', 'user, nearest bucket seq<=B'
    / 'shipped, nearest bucket seq<=B' (no config for the call's sequence-length bucket, one for a bucket B of the
    same dims: the nearest in log2 of the bound, the shorter on a tie), or 'default'.

    A cached config overrides only the keys it names, on top of ``defaults``.
    """
    key = shape_key(program, shape)
    sources = (("user", [user_cache()]), ("shipped", shipped_caches()))
    for source, caches in sources:
        for cache in caches:
            entry = cache.get(gpu, key)
            if entry is not None:
                return {**defaults, **entry["config"]}, source
    _, wanted, dims = split_key(key)
    nearest = None  # (distance, bucket, source rank, config, source)
    for rank, (source, caches) in enumerate(sources):
        for cache in caches:
            for other, entry in cache.load().get(gpu, {}).items():
                if not (isinstance(entry, dict) and isinstance(entry.get("config"), dict)) or other.count("|") < 2:
                    continue
                name, bucket, other_dims = split_key(other)
                if name == program and other_dims == dims:
                    found = (abs(math.log2(bucket) - math.log2(wanted)), bucket, rank, entry["config"], source)
                    nearest = found if nearest is None or found[:3] < nearest[:3] else nearest
    if nearest is not None:
        return {**defaults, **nearest[3]}, f"{nearest[4]}, nearest bucket seq<={nearest[1]}"
    return dict(defaults), "default"


def device_gpu_key(device) -> str:
    """The cache's GPU key for a CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return gpu_key(props.name, f"{props.major}.{props.minor}")


_RESOLVED: dict = {}


def tuned_config(program: str, shape: dict, defaults: dict, device) -> dict:
    """The config a kernel runs with on ``device``: :func:`lookup`, remembered per process.

    Logged once per (program, shape bucket, GPU, defaults) at INFO, saying where it came from.
    """
    gpu = device_gpu_key(device)
    # the defaults are part of the key: they vary with more than the shape bucket (partial dtype, item size)
    memo = (program, shape_key(program, shape), gpu, tuple(sorted(defaults.items())))
    if memo not in _RESOLVED:
        config, source = lookup(program, shape, defaults, gpu)
        logger.info("msa_tl: %s at %s on %s uses the %s config %s", program, memo[1], gpu, source, config)
        _RESOLVED[memo] = config
    return dict(_RESOLVED[memo])


def forget_resolved() -> None:
    """Drop the per-process memo of :func:`tuned_config` (after the tuner writes new winners)."""
    _RESOLVED.clear()
