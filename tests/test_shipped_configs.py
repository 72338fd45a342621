"""The tuned configs shipped in the package (``tuning/configs/*.json``) are valid and are what kernels look up."""

import pytest

from msa_tl.tuning import cache as C
from msa_tl.tuning.objective import PAPER_SHAPE, defaults
from msa_tl.tuning.spaces import SPACES

H100 = C.gpu_key("NVIDIA H100 80GB HBM3", "9.0")
SHIPPED = [(path.name, gpu, key, entry) for path in sorted(C.SHIPPED_DIR.glob("*.json"))
           for gpu, entries in C.ConfigCache(path).load().items() for key, entry in entries.items()]


def parse_key(key):
    """'program|seq<=131072|a=1,b=2' -> (program, shape with seq at the bucket's top).

    Dims the program does not key on (not in its cache key) are taken from the paper shape."""
    program, seq, dims = key.split("|")
    shape = {name: int(value) for name, value in (d.split("=") for d in dims.split(","))}
    return program, dict(PAPER_SHAPE, **shape, seq=int(seq.removeprefix("seq<=")))


def test_the_h100_configs_ship():
    assert any(name == "h100.json" and gpu == H100 for name, gpu, _, _ in SHIPPED)


@pytest.mark.parametrize("name,gpu,key,entry", SHIPPED, ids=[key.split("|")[0] for _, _, key, _ in SHIPPED])
def test_shipped_config_is_a_feasible_point_of_its_space(name, gpu, key, entry):
    program, shape = parse_key(key)
    assert C.shape_key(program, shape) == key
    space = SPACES[program]
    assert set(entry["config"]) <= set(space.params)
    for param, value in entry["config"].items():
        assert value in space.params[param], (param, value)
    assert space.reject({**defaults(program, shape), **entry["config"]}, shape) is None
    assert entry["ms"] > 0 and entry["trials"] >= 1


def test_paper_shape_at_128k_gets_the_shipped_h100_config(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path))  # an empty user cache
    shipped = {parse_key(key)[0]: entry["config"] for name, gpu, key, entry in SHIPPED if gpu == H100}
    for program, config in shipped.items():
        shape = dict(PAPER_SHAPE, seq=131072)
        found, source = C.lookup(program, shape, defaults(program, shape), H100)
        assert source == "shipped" and found == {**defaults(program, shape), **config}
        other = C.lookup(program, shape, defaults(program, shape), C.gpu_key("NVIDIA H200", "9.0"))
        assert other == (defaults(program, shape), "default")
