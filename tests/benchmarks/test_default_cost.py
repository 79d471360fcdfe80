"""benchmarks/default_cost.py: contenders interleaved with a rotating order, ratios taken within a
round, one-line refusals, and a real (tiny) unlearning run timed by the unlearner's own clock."""
import importlib.util
import json
import os

import pytest
from helpers import REPO

PATH = os.path.join(REPO, "benchmarks", "default_cost.py")


@pytest.fixture()
def cost(monkeypatch):
    spec = importlib.util.spec_from_file_location("default_cost", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod.compare_methods, "VARIANTS", dict(mod.compare_methods.VARIANTS))
    return mod


def test_rounds_rotate_the_order_and_ratios_are_taken_within_a_round(cost, monkeypatch, tmp_path, capsys):
    order = []
    clock = {("a", 0): 10.0, ("b", 0): 15.0, ("a", 1): 20.0, ("b", 1): 32.0, ("a", 2): 12.0, ("b", 2): 18.0}

    def fake(pipe, concept, method, seed):
        order.append((method, seed))
        return {"method": method, "seed": seed, "seconds": clock[method, seed], "cache_seconds": 1.0,
                "adversary_seconds": 0.0, "steps": 1}

    monkeypatch.setattr(cost, "measure", fake)
    monkeypatch.setattr("trust_fast.world.load_pipeline", lambda name: None)
    cost.compare_methods.add_variant("a:x0_per_prompt=2")
    cost.compare_methods.add_variant("b:x0_per_prompt=3")
    assert cost.main(["--methods", "a,b", "--rounds", "3", "--results", str(tmp_path)]) == 0
    assert order == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    out = json.loads((tmp_path / "default_cost.json").read_text())
    b = out["rows"][1]
    assert b["ratios"] == [1.5, 1.6, 1.5] and b["ratio"] == 1.5 and b["seconds"] == 18.0
    assert out["rows"][0]["ratio"] == 1.0
    assert "| b | 3 | 18.0 | 1.0 | 0.0 | 1.50 (1.50, 1.60, 1.50) |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [(["--methods", "trust"], "two or more"),
                                        (["--methods", "trust,trust"], "two or more"),
                                        (["--methods", "trust,fmn"], "unknown method(s) fmn"),
                                        (["--rounds", "0"], "--rounds must be >= 1"),
                                        (["--concept", "red+"], "--concept")])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(cost, tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        cost.main([*argv, "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_run_is_timed_by_the_unlearners_clock(cost, shapes_pipe):
    cost.compare_methods.add_variant("tiny:steps=2,x0_per_prompt=1,x0_steps=1,batch_size=2,retain_batch_size=2,adv_steps=1")
    r = cost.measure(shapes_pipe, "red", "tiny", 0)
    assert r["steps"] == 2 and r["seconds"] > r["cache_seconds"] > 0 and r["adversary_seconds"] > 0
