"""benchmarks/compare_methods.py: its method names resolve to valid engine configurations."""
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "benchmarks", "compare_methods.py")


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_methods", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_compared_method_is_a_valid_configuration(compare):
    from trust_fast.methods import config

    cfgs = {}
    for name in compare.METHODS:
        base, extra = compare.VARIANTS.get(name, (name, {}))
        cfgs[name] = config(base, **extra)
        cfgs[name].validate()
    adv = cfgs["trust-adv"]
    assert adv.adv_prefix == 5 and config("trust").adv_prefix == 0
    assert adv.replace(adv_prefix=0) == config("trust")  # the variant differs in the adversary only


def test_unknown_method_is_refused_before_any_run(compare, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--concepts", "red", "--methods", "trust,fmn"])
    with pytest.raises(SystemExit, match="unknown method.*fmn"):
        compare.main()
