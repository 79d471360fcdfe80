"""The step benchmarks run end to end at their smallest size and report every contender."""
import csv
import importlib.util
import os
import shutil

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_overhead_writes_every_contender(tmp_path, capsys):
    out = tmp_path / "overhead.csv"
    assert _load("step_overhead").main(["--sets", "a", "--repeats", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {(r["cache"], r["contender"]) for r in rows} == {
        (c, k) for c in ("warm", "cold") for k in ("masked_step", "masked_step_via_op", "adamw_fused", "adamw_foreach")
    }
    assert all(float(r["median_us"]) > 0 for r in rows)
    assert not (tmp_path / "overhead.csv.tmp").exists()


def test_step_overhead_rejects_bad_repeats():
    with pytest.raises(SystemExit, match="--repeats"):
        _load("step_overhead").main(["--repeats", "0"])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_step_breakdown_times_every_layer(capsys):
    from trust_fast.ops import _native

    if _native.load() is not None:
        pytest.skip("needs the C++ extension")
    assert _load("step_breakdown").main(["--repeats", "1"]) == 0
    text = capsys.readouterr().out
    for name in ("adamw_fused", "masked_step", "public_op", "native_op", "cpp_loop"):
        line = next(l for l in text.splitlines() if l.startswith(name + " "))
        assert float(line.split()[-1]) > 0, line
