"""Does a torch.compile backend give the engine the same weight gradients as eager? A diagnostic for
the inductor defect that makes ``TrustConfig.compile_unet`` refuse inductor (BENCHMARKS.md).

    python scripts/compile_gradient_check.py --backend inductor    # lists the mismatching targets
    python scripts/compile_gradient_check.py --backend aot_eager

Builds the tiny SD pipeline of the tests, two unlearners on copies of it (the second with its
denoiser compiled by hand, bypassing the refusal), one forget batch, and compares the forget loss
and the gradient of every target parameter. Exit code 0 when all match, 1 otherwise.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="inductor")
    a = ap.parse_args(argv)

    import torch

    from tiny_pipelines import tiny_sd_pipeline
    from trust_fast import TrustConfig, TrustUnlearner
    from trust_fast.concepts import parse_concept, user_prompts

    pipe = tiny_sd_pipeline()
    spec = parse_concept("red", world=False)
    prompts = user_prompts(spec, ["a red circle", "a red square", "red car"], ["a blue square", "a green circle"])
    cfg = TrustConfig(x0_per_prompt=1, x0_steps=2, batch_size=2, retain_batch_size=2, amp="off", adv_prefix=0)
    eager, comp = (TrustUnlearner(copy.deepcopy(pipe), spec, cfg, prompts=prompts) for _ in range(2))
    comp.denoiser.forward = torch.compile(comp.unet, backend=a.backend)
    for u in (eager, comp):
        u.prepare()
    b = eager.forget_batch(2)
    losses, grads = [], []
    for u in (eager, comp):
        loss = u.forget_loss(b.noisy, b.t, b.cond, b.anchor)
        losses.append(float(loss.detach()))
        grads.append(torch.autograd.grad(loss, u.params, allow_unused=True))
    print(f"forget loss: eager {losses[0]:.8g}, {a.backend} {losses[1]:.8g}")
    bad = 0
    for name, ge, gc in zip(eager._names, *grads):
        ge = torch.zeros_like(eager.params[0]) if ge is None else ge
        if gc is None or ge.shape != gc.shape or not torch.allclose(ge, gc, rtol=1e-3, atol=1e-7):
            bad += 1
            print(f"  {name}: max |grad| eager {float(ge.abs().max()):.3g}, "
                  f"{a.backend} {float(gc.abs().max()) if gc is not None else None}")
    print(f"{bad} of {len(eager.params)} target gradients differ")
    return 1 if bad or abs(losses[0] - losses[1]) > 1e-6 * max(1.0, abs(losses[0])) else 0


if __name__ == "__main__":
    sys.exit(main())
