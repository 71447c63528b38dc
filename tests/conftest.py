import pytest

from .models import conv_model


@pytest.fixture
def small_model():
    return conv_model([{"in": 8, "out": 16}, {"out": 32, "pads": [1, 1, 1, 1]}, {"out": 24, "k": 1}])
