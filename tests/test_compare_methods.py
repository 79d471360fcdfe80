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
        cfgs[name] = compare.method_config(name)
        cfgs[name].validate()
    adv = cfgs["trust-adv"]
    assert adv.adv_prefix == 5 and config("trust").adv_prefix == 0
    assert adv.replace(adv_prefix=0) == config("trust")  # the variant differs in the adversary only


def test_unknown_method_is_refused_before_any_run(compare, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--concepts", "red", "--methods", "trust,fmn"])
    with pytest.raises(SystemExit, match="unknown method.*fmn"):
        compare.main()


def test_results_block_replaces_only_the_marked_part(compare, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- COMPARE:BEGIN -->\nold table\n<!-- COMPARE:END -->\noutro\n")
    block = "<!-- COMPARE:BEGIN -->\nnew table\n<!-- COMPARE:END -->"
    compare.replace_block(str(readme), block)
    assert readme.read_text() == "intro\n" + block + "\noutro\n"
    plain = tmp_path / "other.md"  # no markers, no heading: left alone
    plain.write_text("text\n")
    compare.replace_block(str(plain), block)
    assert plain.read_text() == "text\n"
    bench = tmp_path / "BENCHMARKS.md"  # no markers, a heading: appended under it
    bench.write_text("# Benchmarks\n")
    compare.replace_block(str(bench), block, "## TRUST vs SalUn vs ESD")
    assert bench.read_text() == "# Benchmarks\n\n## TRUST vs SalUn vs ESD\n\n" + block + "\n"
    assert list(tmp_path.iterdir()) and not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
