"""Data parallel on the CPU: 2 gloo processes unlearn "red" from the built-in model, each rank
drawing its own batches; both must select the same rows every step and end bit-identical."""
import pytest
import os
import socket
import time

import torch
import torch.multiprocessing as mp

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe_loss(u, gen_seed: int = 123) -> float:
    """Forget loss on one fixed batch of the rank's cached forget images (no grad)."""
    g = torch.Generator().manual_seed(gen_seed)
    x0 = u.pools["forget"][:, 0]
    i = torch.arange(x0.shape[0])
    t = torch.randint(0, u.num_train_timesteps, (len(i),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    from trust_fast import objectives

    noisy = objectives.add_noise(x0, noise, t, u.alphas_cumprod)
    with torch.no_grad():
        return float(u.forget_loss(noisy, t, u.emb_forget[i], u.emb_anchor[i]))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from helpers import tiny_config
    from trust_fast import TrustUnlearner
    from trust_fast import distributed as tfd
    from trust_fast.world import load_pipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        u = TrustUnlearner(load_pipeline("shapes", "cpu"), "red",
                           tiny_config(batch=8, steps=STEPS, diag_interval=3))
        u.prepare()
        before = _probe_loss(u)
        rows, losses = [], []
        for _ in range(STEPS):
            s = u.step()
            rows.append([r.clone() for r in u.selected_rows])
            losses.append(s["loss_forget"])
        after = _probe_loss(u)
        mismatch = ""
        try:  # a deliberately rank-dependent selection must fail on every rank
            tfd.check_same_rows([torch.tensor([rank])], step=99)
        except tfd.RankMismatchError as e:
            mismatch = str(e)
        # save_checkpoint called directly on every rank: a user's directory is refused on every rank
        # before any rank writes into it; a new one gets every rank's file
        from trust_fast.checkpoint import save_checkpoint
        from trust_fast.io import OutputError

        refused = ""
        try:
            save_checkpoint(u, os.path.join(out, "users_dir"))
        except OutputError as e:
            refused = str(e)
        save_checkpoint(u, os.path.join(out, "ckpt"))
        torch.save({"rows": rows, "weights": [p.detach().clone() for p in u.params], "before": before,
                    "after": after, "losses": losses, "pool": u.pools["forget"].clone(), "mismatch": mismatch,
                    "prefixes": [q.clone() for q in u.adv_prefixes], "refused": refused},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_select_the_same_rows_and_end_identical(tmp_path):
    users = tmp_path / "users_dir"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    seconds = time.perf_counter() - t0
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    # the ranks really drew different data (seed offset by rank), so the all-reduce mattered
    assert not torch.equal(r0["pool"], r1["pool"])
    assert r0["losses"] != r1["losses"]
    for step, (a, b) in enumerate(zip(r0["rows"], r1["rows"])):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), step
    assert sum(r.numel() for r in r0["rows"][-1]) > 0
    for w0, w1 in zip(r0["weights"], r1["weights"]):
        assert torch.equal(w0, w1)
    # the default's adversary: one prefix, drawn on rank 0, stepped with averaged gradients
    assert len(r0["prefixes"]) == 1 and torch.equal(r0["prefixes"][0], r1["prefixes"][0])
    # the concept's forget loss (distance of the red prompts' prediction from the anchor's) drops
    for r in (r0, r1):
        assert r["after"] < 0.7 * r["before"], (r["before"], r["after"])
    assert "ranks selected different rows at step 99" in r0["mismatch"] and r1["mismatch"]
    # direct checkpoints on every rank: refused everywhere, nothing written into the user's directory
    assert "checkpoint directory" in r0["refused"] and r0["refused"] in r1["refused"]
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("."))
    assert written == ["checkpoint-rank0.pt", "checkpoint-rank1.pt"], written
    print(f"2-rank DDP unlearning test: {seconds:.1f} s")


@pytest.mark.slow
def test_cli_unlearn_under_torchrun_two_ranks(tmp_path):
    """`torchrun --nproc_per_node 2 -m trust_fast.cli unlearn ...`: both ranks train, end with
    bit-identical weights (report.weights_sha256 is checked across ranks before saving), the
    concept's rate drops, rank 0 alone evaluates and writes the pipeline and the report."""
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "trust_fast.cli", "unlearn", "--concept", "red", "--steps", "20",
           "--x0-per-prompt", "1", "--x0-steps", "5", "--batch-size", "8", "--n-per-prompt", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 20
    assert report["ua_before"] >= 0.8 and report["ua_after"] <= 0.5 * report["ua_before"], report["ua_after"]
    assert len(report["weights_sha256"]) == 64
    assert report["mean_selected_rows"] > 0
    # the saved weights are the ones both ranks agreed on
    from trust_fast import distributed as tfd
    from trust_fast.world import load_pipeline

    pipe = load_pipeline(str(out), "cpu")
    names = report["target_patterns"]
    from trust_fast.localize import find_targets

    params = [p for t in find_targets(pipe.unet, names) for p in t.params]
    assert tfd.weights_digest(params) == report["weights_sha256"]
    # one copy of the table and the "wrote" line: only rank 0 printed
    assert r.stdout.count("wrote the unlearned pipeline") == 1
    # the same command again: rank 0 refuses --out (it exists); every rank stops at once with that
    # line (exit 2), none waits for rank 0 in a collective, and the first run's output is untouched
    before = sorted(p.name for p in out.iterdir())
    cmd[cmd.index("--master_port") + 1] = str(_free_port())
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0 and "--out" in again.stderr and "--overwrite" in again.stderr, again.stderr[-2000:]
    # both ranks stop on rank 0's refusal, with its line (not rank 1 failing later in a collective)
    assert again.stderr.count("trust-fast: error: --out") == 2, again.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == before
