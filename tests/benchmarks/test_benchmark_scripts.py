"""The step benchmarks run end to end at their smallest size and report every contender."""
import csv
import importlib.util
import os
import shutil

import pytest
from helpers import REPO

BENCH = os.path.join(REPO, "benchmarks")


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
        (c, k) for c in ("warm", "cold") for k in ("masked_step", "masked_step_via_op", "masked_relocalize", "adamw_fused", "adamw_foreach")
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
    for name in ("adamw_fused", "masked_step", "public_op", "native_op", "empty_native", "optim_wrapper",
                 "grads_list", "cpp_loop"):
        line = next(l for l in text.splitlines() if l.startswith(name + " "))
        assert float(line.split()[-1]) > 0, line
    ceilings = [l for l in text.splitlines() if l.startswith("ceiling of ")]
    assert len(ceilings) == 2 and all(l.endswith("x") and float(l.split()[-1][:-1]) > 0 for l in ceilings), ceilings


def test_gpu_bench_dry_run_on_cpu_records_the_optimizer_step(tmp_path):
    """benchmarks/gpu_bench.py --device cpu: the device script's code paths, on tiny stand-ins."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    from trust_fast.ops import _native

    if _native.load() is not None:
        pytest.skip("needs the C++ extension")
    out = tmp_path / "gpu_bench.csv"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, os.path.join(BENCH, "gpu_bench.py"), "--bench", "--device", "cpu", "--sets", "a",
         "--backends", "cpp", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAILED" not in res.stdout
    rows = list(csv.DictReader(out.open()))
    steps = {(r["impl"], r["fraction"]) for r in rows if r["op"] == "masked_adamw_step"}
    assert steps == {(b, f) for b in ("reference", "cpp") for f in ("0.01", "0.05", "0.25", "1.0")}


def test_triton_plan_host_reports_every_column(capsys):
    pytest.importorskip("triton")
    assert _load("triton_plan_host").main(["--repeats", "2", "--sets", "a"]) == 0
    lines = [l.split() for l in capsys.readouterr().out.splitlines() if l[:2] in ("a ", "b ")]
    assert [l[0] for l in lines] == ["a"] and all(float(x) > 0 for l in lines for x in l[2:])
    import trust_fast.kernels.masked_adamw as K

    assert not isinstance(K._masked_adamw_kernel, _load("triton_plan_host")._NoLaunch)  # the kernel is restored


@pytest.mark.slow
def test_gpu_e2e_script_dry_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_e2e.sh with DRY_RUN=1: the device script's stages, on tiny configs on the CPU,
    write both CSVs with every method and a log."""
    import subprocess

    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path))
    res = subprocess.run(["bash", os.path.join(BENCH, "gpu_e2e.sh")], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    for name, batch in (("e2e_sd15_64.csv", "8+8"), ("e2e_sd15_32.csv", "4+4")):
        rows = list(csv.DictReader((tmp_path / name).open()))
        assert sorted(r["method"] for r in rows) == ["esd", "salun", "trust", "trust-naive"], name
        assert all(r["batch"] == batch and r["device"] == "cpu" and float(r["s_per_step"]) > 0 for r in rows)
        assert {r["amp"] for r in rows if r["method"] != "trust-naive"} == {"bf16"}
    assert "SD-1.5, 512 px" in (tmp_path / "gpu_e2e.log").read_text()


def test_e2e_memory_phases_reports_the_peak_of_every_phase(capsys):
    """The memory-phase profile on tiny configs: a peak for the Hessian probe's phases and the plain
    step's, the state sizes, and a process peak no lower than any phase's."""
    import ast

    assert _load("e2e_memory_phases").main(["--tiny", "--latent", "8", "--amp", "off", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    peaks = ast.literal_eval(out.split("peak GB per phase: ", 1)[1].splitlines()[0])
    assert {"build", "prepare", "step0", "step1", "hstep", "hutch.probe", "forget_loss", "retain_loss"} <= set(peaks)
    process = float(out.split("process peak GB: ", 1)[1].splitlines()[0])
    assert process >= max(peaks.values()) - 0.01 and "hessian_bytes" in out
