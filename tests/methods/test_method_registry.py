"""A method is one module of registered pieces: a method registered from outside the package runs
through the engine, the config's validation and the CLI's --method choices with no other edit."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import small
from trust_fast import TrustConfig, TrustUnlearner, methods
from trust_fast.methods import base


@pytest.fixture
def zero_target_method():
    """A method whose forget objective regresses the prediction to zero and that steps a dense
    optimizer: registered for the test, removed after."""

    @base.register_forget_objective("test-zero")
    class ZeroTarget(base.ForgetObjective):
        needs_frozen = False
        needs_anchor = False
        calls = 0

        def target(self, u, noisy, t, cond, anchor_cond):
            type(self).calls += 1
            return torch.zeros_like(noisy)

    def preset(**overrides):
        return TrustConfig(method="test-zero", forget_objective="test-zero", localization="dense",
                           retain_objective="none", alpha=0.0, hessian="none", adv_prefix=0,
                           x0_from="forget").replace(**overrides)

    base.register_method("test-zero", preset)
    try:
        yield ZeroTarget
    finally:
        del base.FORGET_OBJECTIVES["test-zero"], base.METHODS["test-zero"]


def test_a_registered_method_runs_through_the_engine_and_the_cli_parser(zero_target_method, untrained_world):
    from trust_fast.cli import build_parser

    cfg = methods.config("test-zero", **small(steps=2))
    cfg.validate()
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", cfg)
    before = [p.detach().clone() for p in u.params]
    u.run()
    assert zero_target_method.calls == 2
    assert u.theta0 is None  # the objective needs no frozen model, and no other piece does
    assert all(not torch.equal(p, b) for p, b in zip(u.params, before))  # dense: every target weight moved
    args = build_parser().parse_args(["unlearn", "--concept", "red", "--method", "test-zero", "--out", "x"])
    assert args.method == "test-zero"


def test_validation_refuses_a_piece_nobody_registered():
    with pytest.raises(ValueError, match=r"forget objective must be one of \('anchor', 'pseudo', 'esd'\), got 'nope'"):
        TrustConfig(forget_objective="nope").validate()
    with pytest.raises(ValueError, match="localization must be one of .*'dynamic'.*got 'nope'"):
        TrustConfig(localization="nope").validate()


def test_the_built_in_methods_are_their_registered_pieces():
    assert list(methods.METHODS) == ["trust", "salun", "esd"]
    for name, (objective, localization) in {"trust": ("AnchorMapping", "DynamicRows"),
                                            "salun": ("PseudoLabel", "StaticMask"),
                                            "esd": ("NegativeGuidance", "Dense")}.items():
        cfg = methods.config(name)
        assert base.FORGET_OBJECTIVES[cfg.forget_objective].__name__ == objective
        assert base.LOCALIZATIONS[cfg.localization].__name__ == localization
