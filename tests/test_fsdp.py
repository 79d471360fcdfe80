"""FSDP2 on the CPU: the built-in model's UNet sharded over 2 gloo ranks with
``torch.distributed.fsdp.fully_shard`` (trust_fast.fsdp.shard_denoiser), unlearning "red".

Pinned here:
- sharded and data-parallel (DDP-style) runs on the same seeds select the same rows of the whole
  weights every step and end at the same weights: the gathered saliency and the reduce-scattered
  gradients are the DDP computation, spread over the ranks;
- each rank's optimizer state, frozen copy and Hutchinson diagonal cover its own rows only;
- the finite-difference products H z of the sharded Hessian steps match double backward;
- checkpoint and resume under FSDP2 continue bit for bit; the saved pipeline reloads as a plain
  diffusers model holding the trained weights;
- what FSDP2 does not support is refused in one line before any work.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**kw):
    from helpers import tiny_config

    base = dict(steps=STEPS, diag_interval=2, adv_prefix=2, adv_interval=2, adv_steps=2)
    return tiny_config(batch=8, **{**base, **kw})


def _unlearner(sharded: bool, **kw):
    from trust_fast import TrustUnlearner
    from trust_fast.fsdp import shard_denoiser
    from trust_fast.world import load_pipeline

    pipe = load_pipeline("shapes", "cpu")
    if sharded:
        shard_denoiser(pipe.unet)
    return TrustUnlearner(pipe, "red", _config(**kw))


def _global_rows(u, rows):
    if u.sharding is None:
        return [r.clone() for r in rows]
    return [r + s for r, s in zip(rows, u.sharding.starts)]


def _worker(rank: int, world: int, port: int, out: str, job: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = JOBS[job](rank, out)
        torch.save(result, os.path.join(out, f"{job}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_pair(rank, out):
    """The same run data-parallel and sharded (no Hessian term: its sharded products are finite
    differences, compared with double backward below)."""
    res = {}
    for mode in ("ddp", "fsdp"):
        u = _unlearner(mode == "fsdp", hessian="none")
        start = [w.clone() for w in u.full_params()]
        rows = []
        for _ in range(STEPS):
            u.step()
            rows.append(_global_rows(u, u.selected_rows))
        res[mode] = {"rows": rows, "weights": [w.clone() for w in u.full_params()], "start": start,
                     "state": u.state_bytes(), "local_rows": [t.rows for t in u.targets],
                     "total_rows": u.total_rows, "prefixes": [q.clone() for q in u.adv_prefixes]}
    return res


def _run_diag(rank, out):
    """A sharded run with the default diag Hessian, checkpointed at step 2, resumed, saved."""
    from trust_fast.checkpoint import load_checkpoint

    u = _unlearner(True)
    u.run(2, checkpoint_dir=os.path.join(out, "ckpt"), checkpoint_every=2)
    for _ in range(2, STEPS):
        u.step()
    straight = [p.clone() for p in u.params]
    diags = [d.clone() for d in u.hutchinson.diags]
    u.write_pipeline(os.path.join(out, "saved") if rank == 0 else None)
    full = [w.clone() for w in u.full_params()]  # finalized by the save

    v = _unlearner(True)
    assert load_checkpoint(v, os.path.join(out, "ckpt")) == 2
    for _ in range(2, STEPS):
        v.step()
    return {"straight": straight, "resumed": [p.clone() for p in v.params], "diags": diags,
            "count": u.hutchinson.count, "full": full, "names": list(u._names),
            "selected": [s["selected_rows"] for s in u.history.steps]}


def _run_fd(rank, out):
    """One rank, sharded (world size 1): the finite-difference H z against double backward on a
    plain copy of the same model, with the same probe."""
    from trust_fast.hessian import grad_and_hvps

    torch.manual_seed(0)
    u = _unlearner(True, adv_prefix=0)
    plain = _unlearner(False, adv_prefix=0)
    u.prepare()
    rb = u.retain_batch(8)

    def loss(v):
        return v.retain_loss(rb.noisy, rb.t, rb.cond, x0=rb.x0, noise=rb.noise)

    z = u.hutchinson.draw(1)[0]
    g0 = u.gradients(loss(u))
    with u.sharding.swapped(u.params, [p + u.config.hessian_fd_eps * z.tensor(i, p.dtype)
                                       for i, p in enumerate(u.params)]):
        g1 = u.gradients(loss(u))
    pending = [(a - b) / u.config.hessian_fd_eps for a, b in zip(g1, g0)]
    fd_probe = u.hessian.finite_difference_probes(loss(u), lambda: loss(u), None)
    after = [p.clone() for p in u.params]
    from trust_fast.hessian import RademacherProbe

    zp = RademacherProbe(plain.params, z.seed)
    g_exact, (hz_exact,) = grad_and_hvps(loss(plain), plain.params, [zp])
    refused = {}
    for field, value in (("amp", "bf16"), ("hessian", "hvp"), ("localization", "static")):
        try:
            _unlearner(True, **{field: value})
        except ValueError as e:
            refused[field] = str(e)
    u.step_count = 0  # diag_interval 2: step 0 differentiates twice
    try:
        u.hessian.retain_terms(loss(u), u.step_count)
    except ValueError as e:
        refused["computed_loss"] = str(e)
    # a diffusion transformer (SD3: its transformer_blocks sharded) steps too
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: tiny_pipelines, helpers
    from tiny_pipelines import tiny_sd3_pipeline
    from helpers import tiny_config
    from trust_fast import TrustUnlearner
    from trust_fast.concepts import parse_concept, user_prompts
    from trust_fast.fsdp import shard_denoiser

    sd3 = tiny_sd3_pipeline()
    shard_denoiser(sd3.transformer)
    spec = parse_concept("red", world=False)
    v = TrustUnlearner(sd3, spec, tiny_config(batch=2, min_row_updates=1, diag_interval=1, adv_prefix=1, adv_steps=1),
                       prompts=user_prompts(spec, ["a red circle", "a red square"], ["a blue square"]))
    before = [p.clone() for p in v.params]
    sd3_rows = [v.step()["selected_rows"] for _ in range(2)]
    sd3_moved = sum(float((a - b).abs().sum()) for a, b in zip(v.params, before))
    return {"sd3_rows": sd3_rows, "sd3_moved": sd3_moved, "sd3_count": v.hutchinson.count,
            "g0": g0, "g_exact": g_exact, "hz_fd": pending, "hz_exact": hz_exact,
            "probe_g": fd_probe[0], "probe_n": len(fd_probe[1]), "params_before": [p.clone() for p in plain.params],
            "params_after": after, "refused": refused}


JOBS = {"pair": _run_pair, "diag": _run_diag, "fd": _run_fd}


def _spawn(job: str, world: int, tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), job), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{job}-rank{r}.pt", weights_only=False) for r in range(world)]


def test_sharded_run_selects_and_trains_like_data_parallel(tmp_path):
    r0, r1 = _spawn("pair", 2, tmp_path)
    # each sharded rank trains its own rows; together they are the data-parallel selection
    for step in range(STEPS):
        for k, ddp_rows in enumerate(r0["ddp"]["rows"][step]):
            both = torch.cat([r0["fsdp"]["rows"][step][k], r1["fsdp"]["rows"][step][k]]).sort().values
            assert torch.equal(both, ddp_rows), (step, k)
    assert sum(r.numel() for r in r0["ddp"]["rows"][-1]) > 0
    # the same edit up to the reduction order of the gradients (reduce-scatter against all-reduce), which
    # Adam's normalization amplifies on elements with tiny gradients (seen: 2.6e-5 on one element of 16384,
    # against steps of lr = 1e-2)
    ddp, fsdp, start = r0["ddp"]["weights"], r0["fsdp"]["weights"], r0["ddp"]["start"]
    assert all(torch.equal(a, b) for a, b in zip(start, r0["fsdp"]["start"]))
    edit = sum(float((w - w0).square().sum()) for w, w0 in zip(ddp, start)) ** 0.5
    diff = sum(float((a - b).square().sum()) for a, b in zip(fsdp, ddp)) ** 0.5
    assert edit > 0.1 and diff < 1e-3 * edit, (diff, edit)
    for w_ddp, w_fsdp in zip(ddp, fsdp):
        torch.testing.assert_close(w_fsdp, w_ddp, rtol=0, atol=2e-4)
    moved = sum(float((w - w0).abs().sum()) for w, w0 in zip(r0["fsdp"]["weights"], r1["fsdp"]["weights"]))
    assert moved == 0.0  # both ranks gather the same whole weights
    for a, b in zip(r0["ddp"]["prefixes"], r0["fsdp"]["prefixes"]):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    # each rank holds half of the rows, and half of the optimizer state and the frozen copy
    assert sum(r0["fsdp"]["local_rows"]) + sum(r1["fsdp"]["local_rows"]) == r0["ddp"]["total_rows"]
    for key in ("frozen_copy_bytes", "optimizer_state_bytes"):
        ddp, shards = r0["ddp"]["state"][key], r0["fsdp"]["state"][key] + r1["fsdp"]["state"][key]
        assert ddp > 0 and shards <= ddp and r0["fsdp"]["state"][key] <= 0.6 * ddp, key


def test_sharded_hessian_steps_checkpoint_resume_and_save(tmp_path):
    from diffusers import UNet2DConditionModel

    r0, r1 = _spawn("diag", 2, tmp_path)
    for r in (r0, r1):
        assert r["count"] == 2  # probes folded at steps 0 and 2
        assert all(torch.isfinite(d).all() for d in r["diags"])
        assert sum(float(d.clamp(min=0).sum()) for d in r["diags"]) > 0
        for a, b in zip(r["straight"], r["resumed"]):
            assert torch.equal(a, b)
    assert min(r0["selected"]) > 0
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "saved", subfolder="unet")
    params = dict(saved.named_parameters())
    for name, w in zip(r0["names"], r0["full"]):
        assert torch.equal(params[name].detach(), w), name
    assert type(saved).__name__ == "UNet2DConditionModel"


def test_finite_difference_hessian_products_match_double_backward(tmp_path):
    (r,) = _spawn("fd", 1, tmp_path)
    for g, ge in zip(r["g0"], r["g_exact"]):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-7)
    num = sum(float((a - b).square().sum()) for a, b in zip(r["hz_fd"], r["hz_exact"]))
    den = sum(float(b.square().sum()) for b in r["hz_exact"])
    assert den > 0 and num / den < 0.05 ** 2, num / den  # relative error under 5%
    assert r["probe_n"] == 1
    for a, b in zip(r["params_after"], r["params_before"]):
        assert torch.equal(a, b)  # the shifted weights were restored bit for bit
    for field in ("amp", "hessian", "localization", "computed_loss"):
        assert field in r["refused"], field
    assert "FSDP2" in r["refused"]["amp"] and "MixedPrecisionPolicy" in r["refused"]["amp"]
    assert "function" in r["refused"]["computed_loss"]
    assert min(r["sd3_rows"]) > 0 and r["sd3_moved"] > 0 and r["sd3_count"] == 2


@pytest.mark.slow
def test_cli_unlearn_fsdp_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m trust_fast.cli unlearn --fsdp ...`: the denoiser is sharded
    over the two ranks, rank 0 gathers and writes a plain diffusers pipeline whose target weights
    are the reported digest; --fsdp in one process is refused in one line."""
    import json
    import subprocess
    import sys

    from trust_fast import distributed as tfd
    from trust_fast.localize import find_targets
    from trust_fast.world import load_pipeline

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "trust_fast.cli", "unlearn", "--concept", "red", "--steps", "6", "--fsdp",
           "--x0-per-prompt", "1", "--x0-steps", "2", "--batch-size", "8", "--no-eval", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["fsdp_shards"] == 2 and report["steps"] == 6
    assert 0 < report["mean_selected_rows"] < report["target_rows"]
    pipe = load_pipeline(str(out), "cpu")
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    params = [p for t in find_targets(pipe.unet, report["target_patterns"]) for p in t.params]
    assert tfd.weights_digest(params) == report["weights_sha256"]
    original = load_pipeline("shapes", "cpu")
    before = [p for t in find_targets(original.unet, report["target_patterns"]) for p in t.params]
    assert any(not torch.equal(a, b) for a, b in zip(params, before))

    alone = subprocess.run([sys.executable, "-m", "trust_fast.cli", "unlearn", "--concept", "red", "--fsdp",
                            "--out", str(tmp_path / "alone")], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2 and "torchrun" in alone.stderr and len(alone.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "alone").exists()


def test_swapped_puts_values_in_for_the_pass_and_restores_bit_for_bit():
    """Sharding.swapped: whole shards, or only the rows an edit may have changed (the frozen passes
    of a row-sparse run), with the params' own values back afterwards, bit for bit."""
    from trust_fast.fsdp import Sharding

    g = torch.Generator().manual_seed(0)
    theta0 = [torch.randn(7, 5, generator=g), torch.randn(7, generator=g), torch.randn(3, 2, generator=g)]
    params = [t.clone() for t in theta0]
    edited = [torch.tensor([1, 4]), torch.tensor([1, 4]), torch.zeros(0, dtype=torch.int64)]
    for p, r in zip(params, edited):
        p[r] += 1.0  # a row-sparse edit
    trained = [p.clone() for p in params]
    for rows in (None, edited):
        with Sharding.swapped(params, theta0, rows):
            assert all(torch.equal(p, t) for p, t in zip(params, theta0))
        assert all(torch.equal(p, t) for p, t in zip(params, trained))
    # values made one tensor at a time (the finite-difference probes), whole shards
    with Sharding.swapped(params, (t * 2 for t in trained)):
        assert all(torch.equal(p, t * 2) for p, t in zip(params, trained))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    # rows restrict the copy: a row outside them keeps the edited value during the pass
    with Sharding.swapped(params, theta0, [torch.tensor([1]), None, None]):
        assert torch.equal(params[0][4], trained[0][4]) and torch.equal(params[0][1], theta0[0][1])
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    # a frozen pass inside a whole-shard shift (a finite-difference probe) restores every row, whatever
    # rows it names, and each swap undoes its own
    shifted = [t + 0.5 for t in trained]
    with Sharding.swapped(params, shifted):
        with Sharding.swapped(params, theta0, edited):
            assert all(torch.equal(p, t) for p, t in zip(params, theta0))
        assert all(torch.equal(p, t) for p, t in zip(params, shifted))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    with pytest.raises(ValueError, match="2 row sets for 3 params"):
        with Sharding.swapped(params, theta0, edited[:2]):
            pass
