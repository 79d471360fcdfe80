"""Where the peak memory of a TRUST run at Stable Diffusion 1.5 scale is: the RSS high-water mark
under each phase of its steps (a sampler thread reads /proc/self/statm every 10 ms, every phase
reads it once more at its end, and a reading is charged to the innermost phase running).

    python benchmarks/e2e_memory_phases.py --latent 32                      # bf16, batch 2+2
    python benchmarks/e2e_memory_phases.py --latent 32 --set hessian_micro_batch=1

Runs prepare(), a Hessian step (step 0 folds Hutchinson probes in), a plain step, and a second
Hessian step (step 10, the penalty in place), then prints the peak (GB) per phase, highest first,
and the engine's state_bytes(). Phases: build (pipeline and unlearner), prepare (the image pool),
step0/step1/hstep (outside the phases below), frozen_pred, forget_loss, retain_loss (forwards),
autograd.grad / autograd.grad[create_graph] (backward passes; the Hessian products' backward runs
under hutch.probe), hutch.probe, hutch.fold, optimizer.step. CPU only (RSS); Linux.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs=2, default=(2, 2), metavar=("F", "R"))
    ap.add_argument("--amp", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (seconds; for tests)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a TrustConfig field")
    a = ap.parse_args(argv)

    import torch

    import e2e

    torch.set_num_threads(a.threads)
    page = os.sysconf("SC_PAGE_SIZE")
    label, peaks = ["build"], {}

    def rss_gb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2 ** 30

    def note() -> None:
        r, name = rss_gb(), label[0]
        if r > peaks.get(name, 0.0):
            peaks[name] = r

    def sample() -> None:
        while True:
            note()
            time.sleep(0.01)

    def phase(name, fn):
        def run(*args, **kw):  # the phase's readings: the sampler's, and one at its end
            outer, label[0] = label[0], name
            try:
                return fn(*args, **kw)
            finally:
                note()
                label[0] = outer
        return run

    threading.Thread(target=sample, daemon=True).start()
    pipe = e2e.build_pipeline("sd15", a.latent, a.tiny)
    note()
    u = e2e.unlearner_for(pipe, "trust", tuple(a.batch), 2, 4, amp=a.amp, overrides=dict(e2e._field(s) for s in a.set))
    grad = torch.autograd.grad
    torch.autograd.grad = lambda *x, **k: phase(
        "autograd.grad" + ("[create_graph]" if k.get("create_graph") else ""), grad)(*x, **k)
    try:
        label[0] = "prepare"
        u.prepare()
        note()
        for name in ("retain_loss", "forget_loss", "frozen_pred"):
            setattr(u, name, phase(name, getattr(u, name)))
        if u.hutchinson is not None:
            for name in ("probe", "fold"):
                setattr(u.hutchinson, name, phase("hutch." + name, getattr(u.hutchinson, name)))
        u.optimizer.step = phase("optimizer.step", u.optimizer.step)
        seconds, before = {}, {}
        for name, count in (("step0", 0), ("step1", 1), ("hstep", u.config.diag_interval)):
            before[name] = rss_gb()
            label[0] = name
            u.step_count = count
            seconds[name] = u.step()["seconds"]
            note()
        time.sleep(0.05)
    finally:
        torch.autograd.grad = grad
    print("seconds:", {k: round(v, 1) for k, v in seconds.items()})
    print("RSS GB before each step:", {k: round(v, 2) for k, v in before.items()})
    print("peak GB per phase:", {k: round(v, 2) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])})
    print(f"process peak GB: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f}")
    print("state MB:", {k: round(v / 2 ** 20) for k, v in u.state_bytes().items() if isinstance(v, (int, float))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
