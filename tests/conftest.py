import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shapes_pipe():
    """The shipped shapes-world pipeline on the CPU (loaded once per session; do not mutate)."""
    from trust_fast.world import load_pipeline

    return load_pipeline("shapes", device="cpu")


@pytest.fixture(scope="session")
def classifier():
    from trust_fast.world import load_classifier

    return load_classifier()
