import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project is a folder of scripts, not an installed package
REAL_DATA = os.path.join(ROOT, "..", "shared", "data", "cifar-10-batches-py")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def synthetic_data(tmp_path):
    from data import write_synthetic_cifar
    return write_synthetic_cifar(str(tmp_path / "data"), num_train=40, num_test=20)


def assert_same_checkpoint_weights(a, b):
    """The model and EMA weights of two loaded checkpoints are bitwise equal."""
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
