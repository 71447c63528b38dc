import os

# the suite runs on 2 cores: keep BLAS from oversubscribing them (set before numpy loads)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest

from .models import conv_model


@pytest.fixture
def small_model():
    return conv_model([{"in": 8, "out": 16}, {"out": 32, "pads": [1, 1, 1, 1]}, {"out": 24, "k": 1}])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
