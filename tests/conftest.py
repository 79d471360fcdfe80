"""Fixtures shared by the test files. Models are built once per session (the shipped world,
which no test changes) or once per module (the tiny untrained ones: building them seeds torch's
global generator, so each module sees the same random state it did when it built its own; tests
that change a model take a deep copy). The tiny-run config and other plain helpers are in
helpers.py; the tiny pipelines of every family in tiny_pipelines.py.

Two tiers. `python -m pytest -q` (the README's command) runs the fast tier: every test not marked
`slow`. The slow tier (end-to-end training, sampling and behaviour on the shipped world) runs with
`-m slow`, all of it with `-m ""`, and a slow test also runs whenever its file or node id is named
on the command line (`pytest tests/methods/test_behaviour.py`). .ci/run runs both tiers."""
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


@pytest.fixture(scope="module")
def untrained_world():
    """A shapes-world pipeline with freshly initialised weights (seed 0), once per module; deep-copy
    it before changing it."""
    from trust_fast.world.train import build_untrained_pipeline

    return build_untrained_pipeline(0)


@pytest.fixture(scope="module")
def tiny_sd():
    """tiny_pipelines.tiny_sd_pipeline(), once per module; deep-copy it before changing it."""
    from tiny_pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline()


def pytest_collection_modifyitems(config, items):
    """Deselect the slow tier unless asked for: by a -m expression, or by naming the test's file."""
    if config.option.markexpr:
        return
    named = {os.path.abspath(str(a).split("::")[0]) for a in config.args}
    slow = [it for it in items if it.get_closest_marker("slow") and str(it.path) not in named]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [it for it in items if it not in slow]
