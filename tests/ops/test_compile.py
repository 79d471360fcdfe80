"""torch.compile: the engine's op layer (localization, masked AdamW) runs as compiled graphs with
the custom ops traced through their fake implementations, no graph break, same result as eager."""
import copy

import pytest
import torch

from helpers import tiny_config
from trust_fast import TrustUnlearner, ops
from trust_fast.concepts import parse_concept
from trust_fast.world.concepts import world_prompts
from trust_fast.localize import localize_rows


def _explain(fn, *args, **kwargs):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return torch._dynamo.explain(fn)(*args, **kwargs)


def test_op_layer_functions_trace_as_one_graph():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(40, 8, generator=gen), torch.randn(24, 4, 3, 3, generator=gen)]
    weights = [torch.randn(g.shape, generator=gen) for g in grads]
    ex = _explain(localize_rows, grads, weights, [40, 24], "gw", 1.0, 0.5)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    rows = [torch.tensor([1, 7]), torch.tensor([3])]
    state = [[torch.zeros(2, g[0].numel()) for g in grads], [torch.zeros(2, g[0].numel()) for g in grads],
             [torch.zeros(2) for _ in grads], [torch.tensor([0, 1]), torch.tensor([0])]]
    ex = _explain(ops.masked_adamw_, weights, grads, state[0], state[1], state[2], rows, state[3], lr=1e-2)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


def test_compiled_engine_steps_equal_eager(untrained_world):
    cfg = tiny_config(diag_interval=1)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        u = TrustUnlearner(copy.deepcopy(untrained_world), "red", cfg.replace(compile=compiled),
                           prompts=world_prompts(parse_concept("red")))
        rows = []
        for _ in range(3):
            u.step()
            rows.append([r.clone() for r in u.selected_rows])
        runs[compiled] = rows, [p.detach().clone() for p in u.params]
    (rows_e, w_e), (rows_c, w_c) = runs[False], runs[True]
    for a, b in zip(rows_e, rows_c):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sum(r.numel() for r in rows_c[-1]) > 0
    for a, b in zip(w_e, w_c):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_the_compile_gradient_check_passes_for_aot_eager(capsys):
    """scripts/compile_gradient_check.py, the diagnostic of the inductor defect, finds aot_eager's
    gradients equal to eager's (the backend compile_unet accepts)."""
    import importlib.util
    import os

    from helpers import REPO

    path = os.path.join(REPO, "scripts", "compile_gradient_check.py")
    spec = importlib.util.spec_from_file_location("compile_gradient_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--backend", "aot_eager"]) == 0
    assert "0 of " in capsys.readouterr().out
