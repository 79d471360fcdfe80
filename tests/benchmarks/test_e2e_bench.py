"""benchmarks/e2e.py on tiny configs of the SD-1.5 structure: its naive TRUST step is the same
math as the library's (same rows, same first update), and the script runs and reports."""
from __future__ import annotations

import csv
import importlib.util
import os

import pytest
import torch
from helpers import REPO

ROOT = REPO


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e", os.path.join(ROOT, "benchmarks", "e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_naive_trust_selects_the_same_rows_and_makes_the_same_first_update(e2e, arch):
    """Two identical tiny pipelines, same seed: the library's step and the naive step see the same
    batches, select the same rows and (Adam's first step, Delta = 0 so no Hessian penalty yet)
    move the weights the same way; the naive frozen copy stays the original."""
    a, b = e2e.build_pipeline(arch, 8, tiny=True), e2e.build_pipeline(arch, 8, tiny=True)
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))
    ua = e2e.unlearner_for(a, "trust", (2, 2), 1, 2)
    ub = e2e.unlearner_for(b, "trust-naive", (2, 2), 1, 2)
    naive = e2e.NaiveTrust(ub)
    before = [p.detach().clone() for p in ua.params]
    sa, sb = ua.step(), naive.step()
    assert sa["selected_rows"] == sb["selected_rows"] > 0
    for ra, rb in zip(ua.selected_rows, naive.rows):
        assert torch.equal(ra.cpu(), rb.cpu())
    # Adam's first step is lr * g / (|g| + eps): equal up to float rounding, except where |g| is
    # near eps and the two summation orders tip it; such elements are rare and move at most lr
    lr = ua.config.lr
    far = sum(int((~torch.isclose(p, q, rtol=1e-4, atol=1e-5)).sum()) for p, q in zip(ua.params, ub.params))
    assert far <= 1e-3 * sum(p.numel() for p in ua.params), far
    assert max(float((p - q).detach().abs().max()) for p, q in zip(ua.params, ub.params)) <= 2 * lr
    assert any(not torch.equal(p, p0) for p, p0 in zip(ua.params, before))
    frozen = dict(naive.frozen.named_parameters())
    assert all(torch.equal(frozen[n], p0) for n, p0 in zip(ub._names, ub.theta0))


@pytest.mark.slow
def test_the_script_reports_every_method_with_ratios(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.csv"
    rc = e2e.main(["--tiny", "--steps", "1", "--methods", "trust", "trust-naive", "esd", "--out", str(out)])
    assert rc == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"trust", "trust-naive", "esd"}
    for r in rows.values():
        assert float(r["s_per_step"]) > 0 and float(r["peak_mem_mb"]) > 0 and float(r["projected_run_s"]) > 0
    assert float(rows["trust"]["selected_fraction"]) < 0.5 and float(rows["esd"]["selected_fraction"]) == 1.0
    # the library's sparse optimizer state is smaller than dense AdamW's
    assert float(rows["trust"]["optimizer_state_mb"]) < float(rows["trust-naive"]["optimizer_state_mb"])
    table = capsys.readouterr().out
    assert "| trust | " in table and "1.00x" in table
    # the table renders again from the saved CSV (how BENCHMARKS.md's is made)
    assert e2e.main(["--table-from", str(out)]) == 0
    rendered = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert rendered == [ln for ln in table.splitlines() if ln.startswith("|")]


def test_out_is_claimed_like_every_output(e2e, tmp_path, capsys):
    """--out goes through trust_fast.io.claim_output: a file that is not an earlier e2e CSV is never
    replaced, an earlier one only with --overwrite."""
    saved = tmp_path / "saved.csv"
    saved.write_text("method,s_per_step,selected_fraction,x0_pool_s,peak_mem_mb,optimizer_state_mb,projected_run_s\n"
                     "trust,1.5,0.05,2.0,100,1.0,92\n")
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\n1,2\n")
    from trust_fast.io import OutputError

    with pytest.raises(OutputError):
        e2e.main(["--table-from", str(saved), "--out", str(notes), "--overwrite"])
    assert notes.read_text() == "my,own\n1,2\n"
    out = tmp_path / "table.csv"
    assert e2e.main(["--table-from", str(saved), "--out", str(out)]) == 0
    with pytest.raises(OutputError):
        e2e.main(["--table-from", str(saved), "--out", str(out)])
    assert e2e.main(["--table-from", str(saved), "--out", str(out), "--overwrite"]) == 0
    assert list(csv.DictReader(open(out)))[0]["s_per_step"] == "1.5"
