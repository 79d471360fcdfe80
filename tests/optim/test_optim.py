"""MaskedAdamW against torch.optim.AdamW, row by row, on every CPU backend."""

from __future__ import annotations

import copy
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import trust_fast.ops as ops
from trust_fast.optim import MaskedAdamW

HP = dict(lr=0.05, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
ROW_SETS = [[0, 2], [2, 3, 6], [], [0, 6], [1], [0, 1, 2, 3, 4, 5, 6], [5, 2]]


@pytest.fixture(params=["reference", "cpp", "triton"])
def backend(request):
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 (this run has a GPU)")
    reason = ops.registry.get_backend(request.param).unavailable_reason("cpu")
    assert reason is None, f"backend {request.param} should be available on cpu: {reason}"
    with ops.use_backend(request.param):
        yield request.param


def _layer(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Parameter(torch.randn(7, 3, 2, 2, generator=gen).to(dtype))
    bias = torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype))
    return conv, bias


def test_matches_per_row_adamw_over_changing_row_sets(backend):
    """Each row equals a separate torch AdamW over that row alone, stepped only when selected."""
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    per_row = {}
    for r in range(7):
        rw = torch.nn.Parameter(w.detach()[r].clone())
        rb = torch.nn.Parameter(b.detach()[r : r + 1].clone())
        per_row[r] = (rw, rb, torch.optim.AdamW([rw, rb], **HP))
    gen = torch.Generator().manual_seed(1)
    untouched_w = w.detach().clone()
    for rows in ROW_SETS:
        w.grad = torch.randn(w.shape, generator=gen)
        b.grad = torch.randn(b.shape, generator=gen)
        before = w.detach().clone()
        idx = torch.tensor(rows, dtype=torch.int64)
        opt.set_rows({w: idx, b: idx})
        opt.step()
        others = [r for r in range(7) if r not in rows]
        assert torch.equal(w.detach()[others], before[others]), "unselected rows must be bit-identical"
        for r in rows:
            rw, rb, o = per_row[r]
            rw.grad = w.grad[r].clone()
            rb.grad = b.grad[r : r + 1].clone()
            o.step()
    for r in range(7):
        rw, rb, _ = per_row[r]
        torch.testing.assert_close(w.detach()[r], rw.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.detach()[r : r + 1], rb.detach(), rtol=1e-5, atol=1e-6)
    # rows never selected keep their initial values exactly (no weight decay either)
    never = [r for r in range(7) if not any(r in s for s in ROW_SETS)]
    assert torch.equal(w.detach()[never], untouched_w[never])
    steps = opt.state[w]["step"][opt.state[w]["slot_of_row"].long()]
    assert steps.tolist() == [sum(r in s for s in ROW_SETS) for r in range(7)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_use_float32_math(backend, dtype):
    """fp16/bf16 params: within one storage rounding of float32 AdamW run on the float32 copy."""
    w, b = _layer(dtype)
    w32 = torch.nn.Parameter(w.detach().float())
    opt = MaskedAdamW([w, b], **HP)
    ref = MaskedAdamW([w32], **HP)
    gen = torch.Generator().manual_seed(2)
    for rows in ROW_SETS[:3]:
        g = torch.randn(w.shape, generator=gen)
        w.grad, w32.grad = g.to(dtype), g.to(dtype).float()
        idx = torch.tensor(rows, dtype=torch.int64)
        opt.set_rows({w: idx})
        with ops.use_backend("reference"):
            ref.set_rows({w32: idx})
            ref.step()
        opt.step()
        w32.data.copy_(w32.detach().to(dtype).float())  # same storage rounding as the low-precision param
    assert opt.state[w]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(w.detach().float(), w32.detach(), rtol=0, atol=float(torch.finfo(dtype).eps) * 8)


def test_penalty_equals_gradient_term(backend):
    """set_penalty adds lam*h*(p - p0) to the gradient of updated rows, per row and per element."""
    gen = torch.Generator().manual_seed(3)
    for per_row in (True, False):
        w, b = _layer(seed=4)
        w_ref = torch.nn.Parameter(w.detach().clone())
        p0 = w.detach() + 0.3 * torch.randn(w.shape, generator=gen)
        h = torch.rand(7 if per_row else w.shape, generator=gen)
        lam = 0.8
        opt = MaskedAdamW([w, b], **HP)
        ref = torch.optim.AdamW([w_ref], **HP)
        opt.set_penalty({w: (h, p0)}, lam)
        rows = torch.arange(7)
        for _ in range(3):
            g = torch.randn(w.shape, generator=gen)
            w.grad = g.clone()
            h_full = h.view(7, 1, 1, 1) if per_row else h
            w_ref.grad = g + lam * h_full * (w_ref.detach() - p0)
            opt.set_rows({w: rows})
            opt.step()
            ref.step()
        torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-5, atol=1e-6)
    opt.set_penalty({}, 0.0)
    before = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()  # no penalty and zero grad: only the moment decay moves the weights
    assert not torch.equal(before, w.detach())


def test_state_dict_round_trip_continues_identically(backend):
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    gen = torch.Generator().manual_seed(5)
    grads = [(torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)) for _ in ROW_SETS]
    for (gw, gb), rows in zip(grads[:3], ROW_SETS[:3]):
        w.grad, b.grad = gw, gb
        opt.set_rows({w: torch.tensor(rows, dtype=torch.int64), b: torch.tensor(rows, dtype=torch.int64)})
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    w2 = torch.nn.Parameter(w.detach().clone())
    b2 = torch.nn.Parameter(b.detach().clone())
    opt2 = MaskedAdamW([w2, b2], lr=1.0)  # hyperparameters come back from the state dict too
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == HP["lr"]
    assert torch.equal(opt2.state[w2]["slot_of_row"], opt.state[w]["slot_of_row"])
    assert opt2.state[w2]["exp_avg"].dtype == torch.float32
    for (gw, gb), rows in zip(grads[3:], ROW_SETS[3:]):
        idx = torch.tensor(rows, dtype=torch.int64)
        for o, p, q in ((opt, w, b), (opt2, w2, b2)):
            p.grad, q.grad = gw.clone(), gb.clone()
            o.set_rows({p: idx, q: idx})
            o.step()
    assert torch.equal(w.detach(), w2.detach()) and torch.equal(b.detach(), b2.detach())


def test_step_before_set_rows_raises_and_empty_rows_are_a_no_op():
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    w.grad, b.grad = torch.randn(w.shape), torch.randn(b.shape)
    before_w, before_b = w.detach().clone(), b.detach().clone()
    with pytest.raises(RuntimeError, match=r"call set_rows\(\.\.\.\) before step\(\)"):
        opt.step()
    for rows in ({w: torch.tensor([], dtype=torch.int64), b: torch.tensor([], dtype=torch.int32)}, {}):
        opt.set_rows(rows)  # explicitly nothing: a legitimate no-op step
        opt.step()
        assert torch.equal(w.detach(), before_w) and torch.equal(b.detach(), before_b)


def _two_steps_rows(opt, w, b, grads):
    """Changed rows of w and b in each of two steps on the rows already set."""
    changed = []
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        before_w, before_b = w.detach().clone(), b.detach().clone()
        opt.step()
        changed.append((_changed_rows(before_w, w.detach()), _changed_rows(before_b, b.detach())))
    return changed


def test_state_dict_round_trip_keeps_the_rows(backend):
    """load_state_dict used to clear the rows, so the next step() updated nothing."""
    gen = torch.Generator().manual_seed(8)
    grads = [(torch.randn(7, 3, 2, 2, generator=gen), torch.randn(7, generator=gen)) for _ in range(3)]
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    opt.set_rows({w: torch.tensor([1, 4]), b: torch.tensor([2])})
    w.grad, b.grad = grads[0]
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    # into a fresh optimizer over copies of the params: the rows come back from the state dict
    w2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    opt2 = MaskedAdamW([w2, b2], lr=1.0)
    opt2.load_state_dict(saved)
    # into the same optimizer
    opt.load_state_dict(copy.deepcopy(saved))
    # a third run without the round trip, for the values
    w3, b3 = _layer()
    opt3 = MaskedAdamW([w3, b3], **HP)
    opt3.set_rows({w3: torch.tensor([1, 4]), b3: torch.tensor([2])})
    w3.grad, b3.grad = grads[0]
    opt3.step()
    for o, p, q in ((opt, w, b), (opt2, w2, b2), (opt3, w3, b3)):
        assert _two_steps_rows(o, p, q, grads[1:]) == [([1, 4], [2])] * 2
    assert torch.equal(w.detach(), w3.detach()) and torch.equal(w2.detach(), w3.detach())
    assert torch.equal(b.detach(), b3.detach()) and torch.equal(b2.detach(), b3.detach())


def test_a_deep_copy_keeps_rows_and_penalty_and_steps_like_the_original():
    """torch's Optimizer pickles only defaults, state and param_groups: a deep copy (of an
    unlearner, say) lost the rows and refused to step."""
    gen = torch.Generator().manual_seed(9)
    grads = [(torch.randn(7, 3, 2, 2, generator=gen), torch.randn(7, generator=gen)) for _ in range(2)]
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    opt.set_rows({w: torch.tensor([0, 5]), b: torch.tensor([5])})
    opt.set_penalty({w: (torch.ones_like(w), torch.zeros_like(w))}, lam=0.5)
    w.grad, b.grad = grads[0]
    opt.step()
    twin = copy.deepcopy({"opt": opt, "w": w, "b": b})
    for o, p, q in ((opt, w, b), (twin["opt"], twin["w"], twin["b"])):
        p.grad, q.grad = grads[1]
        o.step()
    assert torch.equal(w, twin["w"]) and torch.equal(b, twin["b"])
    assert not torch.equal(w[0], _layer()[0][0])  # the rows moved (and the penalty came along: same values)


def test_load_state_dict_without_saved_rows_keeps_the_rows_set():
    """A state dict without rows (made before they were saved) keeps the rows set, with the loaded
    state; rows the loaded state has never seen get fresh slots."""
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    opt.set_rows({w: torch.tensor([0, 3])})
    w.grad = torch.randn(w.shape)
    opt.step()
    saved = opt.state_dict()
    del saved["rows"]
    opt.set_rows({w: torch.tensor([3, 6])})  # row 6 has no slot in the saved state
    opt.load_state_dict(saved)
    assert _two_steps_rows(opt, w, b, [(torch.randn(w.shape), torch.randn(b.shape))]) == [([3, 6], [])]
    rows, counts = opt.row_updates(w)
    assert dict(zip(rows.tolist(), counts.tolist())) == {0: 1, 3: 2, 6: 1}
    # never set rows: a round trip keeps them unset
    fresh = MaskedAdamW([w, b], **HP)
    fresh.load_state_dict(MaskedAdamW([w, b], **HP).state_dict())
    with pytest.raises(RuntimeError, match=r"call set_rows\(\.\.\.\) before step\(\)"):
        fresh.step()


def _corrupt(sd: dict, how: str) -> dict:
    st0 = sd["state"][0]
    cap = st0["step"].shape[0]
    if how == "exp_avg width":
        st0["exp_avg"] = torch.zeros(cap, 11)
    elif how == "exp_avg dtype":
        st0["exp_avg"] = st0["exp_avg"].double()
    elif how == "missing exp_avg_sq":
        del st0["exp_avg_sq"]
    elif how == "step shape":
        st0["step"] = torch.zeros(cap, 1)
    elif how == "slot_of_row length":
        sd["state"][1]["slot_of_row"] = torch.full((6,), -1, dtype=torch.int32)
    elif how == "slot out of range":
        st0["slot_of_row"][5] = 9
    elif how == "row out of range":
        st0["row_of_slot"][0] = 7
    elif how == "tables disagree":
        st0["slot_of_row"][4] = st0["slot_of_row"][1]  # two rows in one slot, row 4's slot unowned
    elif how == "num_slots over capacity":
        st0["num_slots"] = cap + 1
    elif how == "num_slots not an int":
        st0["num_slots"] = 2.0
    elif how == "unknown param index":
        sd["state"][5] = sd["state"][1]
    elif how == "param count":
        sd["param_groups"][0]["params"] = [0]
    elif how == "no param_groups":
        del sd["param_groups"]
    elif how == "negative lr":
        sd["param_groups"][0]["lr"] = -1.0
    elif how == "rows out of range":
        sd["rows"] = {0: torch.tensor([1, 7])}
    elif how == "float rows":
        sd["rows"] = {0: torch.tensor([1.0, 4.0])}
    elif how == "repeated rows":
        sd["rows"] = {1: torch.tensor([2, 2])}
    elif how == "rows of unknown param":
        sd["rows"] = {3: torch.tensor([0])}
    return sd


CORRUPTIONS = {
    "exp_avg width": r"parameter #0 .*'exp_avg' is torch.float32 \(\d+, 11\), expected torch.float32 \(\d+, 12\)",
    "exp_avg dtype": r"parameter #0 .*'exp_avg' is torch.float64",
    "missing exp_avg_sq": r"parameter #0 .*'exp_avg_sq' missing",
    "step shape": r"parameter #0 .*'step' is torch.float32 \(\d+, 1\), expected a 1-D",
    "slot_of_row length":
        r"parameter #1 of shape \(7,\).*'slot_of_row' is torch.int32 \(6,\), expected torch.int32 \(7,\)",
    "slot out of range": r"parameter #0 .*'slot_of_row' holds slot 9",
    "row out of range": r"parameter #0 .*'row_of_slot' holds row 7",
    "tables disagree": r"parameter #0 .*'slot_of_row' and 'row_of_slot' disagree",
    "num_slots over capacity": r"parameter #0 .*'num_slots' is \d+ but the state holds \d+ slots",
    "num_slots not an int": r"parameter #0 .*'num_slots' must be an int",
    "unknown param index": r"'state' has an entry for param index 5",
    "param count": r"param group 0 has 2 params but the state_dict's has 1",
    "no param_groups": r"'param_groups'",
    "negative lr": r"param group 0: lr must be",
    "rows out of range": r"rows of parameter #0 .*hold row 7, out of range \[0, 7\)",
    "float rows": r"rows of parameter #0 .*torch.float32",
    "repeated rows": r"rows of parameter #1 .*more than once",
    "rows of unknown param": r"'rows' has an entry for param index 3",
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_load_state_dict_refuses_a_damaged_state_and_changes_nothing(how):
    """The checkpoint loader relies on a ValueError (one line, naming what is wrong) before any change."""
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    opt.set_rows({w: torch.tensor([1, 4]), b: torch.tensor([2])})
    w.grad, b.grad = torch.randn(w.shape), torch.randn(b.shape)
    opt.step()
    twin_w, twin_b = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    twin = MaskedAdamW([twin_w, twin_b], **HP)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    bad = _corrupt(copy.deepcopy(opt.state_dict()), how)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(bad)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(CORRUPTIONS[how], msg), msg
    # nothing was restored: the optimizer steps exactly as its twin, on the same rows
    assert opt.param_groups[0]["lr"] == HP["lr"]
    gen = torch.Generator().manual_seed(9)
    gw, gb = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
    w.grad, b.grad, twin_w.grad, twin_b.grad = gw, gb, gw.clone(), gb.clone()
    before = w.detach().clone()
    opt.step()
    twin.step()
    assert _changed_rows(before, w.detach()) == [1, 4]
    assert torch.equal(w.detach(), twin_w.detach()) and torch.equal(b.detach(), twin_b.detach())


def test_bf16_state_dict_keeps_float32_state():
    w, b = _layer(torch.bfloat16)
    opt = MaskedAdamW([w, b], **HP)
    w.grad = torch.randn(w.shape).to(torch.bfloat16)
    opt.set_rows({w: torch.tensor([1, 3])})
    opt.step()
    opt2 = MaskedAdamW([w, b], **HP)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[w]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[w]["exp_avg"], opt.state[w]["exp_avg"])


def test_state_memory_follows_selected_rows():
    gen = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(400, 64, generator=gen)) for _ in range(3)]
    opt = MaskedAdamW(params)
    dense = sum(2 * p.numel() * 4 for p in params)  # exp_avg + exp_avg_sq in float32
    opt.set_rows({p: torch.randperm(400, generator=gen)[:20] for p in params})  # 5%
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert opt.state_bytes() <= 0.06 * dense
    # rows selected again reuse their slots; new rows extend the state
    first = {id(p): opt.state[p]["num_slots"] for p in params}
    opt.set_rows({params[0]: opt.state[params[0]]["row_of_slot"][:10]})
    assert opt.state[params[0]]["num_slots"] == first[id(params[0])]
    opt.set_rows({params[0]: torch.arange(400)})
    assert opt.state[params[0]]["num_slots"] == 400


def test_absent_params_and_params_without_grad_are_not_updated():
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    w.grad = torch.randn(w.shape)
    before_w, before_b = w.detach().clone(), b.detach().clone()
    opt.set_rows({b: torch.tensor([0, 1])})  # b has no grad, w is absent
    opt.step()
    assert torch.equal(w.detach(), before_w) and torch.equal(b.detach(), before_b)


def test_set_rows_and_penalty_errors():
    w, b = _layer()
    stranger = torch.nn.Parameter(torch.randn(3, 3))
    opt = MaskedAdamW([w, b])
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.set_rows({stranger: torch.tensor([0])})
    with pytest.raises(IndexError, match="out of range"):
        opt.set_rows({w: torch.tensor([7])})
    with pytest.raises(ValueError, match="more than once"):
        opt.set_rows({w: torch.tensor([1, 1])})
    with pytest.raises(TypeError, match="tensor of row indices"):
        opt.set_rows({w: [0, 1]})
    with pytest.raises(ValueError, match="h of parameter #0 has shape"):
        opt.set_penalty({w: (torch.ones(3), w.detach())}, 1.0)
    with pytest.raises(ValueError, match="p0 of parameter #0 has shape"):
        opt.set_penalty({w: (torch.ones(7), torch.ones(3))}, 1.0)
    with pytest.raises(ValueError, match="lr"):
        MaskedAdamW([w], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW([w], betas=(1.0, 0.9))


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return (after != before).reshape(before.shape[0], -1).any(1).nonzero().flatten().tolist()


@pytest.mark.parametrize("rows, dtype", [([0.9, 2.7], torch.float32), ([0.0, 2.0], torch.float64),
                                         ([True, False, True, False, False, False, False], torch.bool)])
def test_set_rows_refuses_non_integer_rows(rows, dtype):
    """Float rows were truncated ([0.9, 2.7] updated rows 0 and 2) and a bool mask was read as the
    indices 0 and 1: both are refused, naming the parameter by its place in the optimizer."""
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    opt.set_rows({w: torch.tensor([4]), b: torch.tensor([4])})
    with pytest.raises(TypeError) as err:
        opt.set_rows({b: torch.tensor(rows, dtype=dtype)})
    msg = str(err.value)
    assert "\n" not in msg
    assert "parameter #1 of shape (7,)" in msg and str(dtype) in msg and "mask.nonzero().flatten()" in msg
    w.grad, b.grad = torch.randn(w.shape), torch.randn(b.shape)
    before_w, before_b = w.detach().clone(), b.detach().clone()
    opt.step()  # the refused call changed nothing: the rows set before are updated
    assert _changed_rows(before_w, w.detach()) == [4] and _changed_rows(before_b, b.detach()) == [4]


def test_set_rows_takes_any_integer_dtype():
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        opt.set_rows({w: torch.tensor([2, 5], dtype=dtype)})
        w.grad = torch.randn(w.shape)
        before = w.detach().clone()
        opt.step()
        assert _changed_rows(before, w.detach()) == [2, 5], dtype

def test_set_rows_refuses_non_contiguous_params():
    """A transposed weight used to pass set_rows and fail in step() as the op's "params[0]"."""
    w, b = _layer()
    t = torch.nn.Parameter(torch.randn(3, 5).t())  # shape (5, 3), not contiguous
    opt = MaskedAdamW([w, b, t], **HP)
    with pytest.raises(ValueError) as err:
        opt.set_rows({t: torch.tensor([0, 1])})
    msg = str(err.value)
    assert "\n" not in msg and "parameter #2 of shape (5, 3)" in msg and "contiguous" in msg
    with pytest.raises(ValueError, match=r"parameter #2 of shape \(5, 3\) is not contiguous"):
        opt.set_rows({w: torch.tensor([0]), t: torch.tensor([], dtype=torch.int64)})



# ---------------------------------------------------------------------------
# repeated steps on one row set: the op's per-tensor checks run once, then the kernel directly


def _count_checks(monkeypatch) -> list[int]:
    from trust_fast.ops import reference

    calls = [0]
    real = reference.check_masked_adamw

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(reference, "check_masked_adamw", counting)
    return calls


def test_repeated_steps_check_once_and_match_the_checked_path(backend, monkeypatch):
    """Same rows, several steps: new gradient tensors and in-place ones, with a penalty on one param.
    The direct kernel call gives bit for bit what the op (checks every step) gives."""
    w, b = _layer()
    w_slow, b_slow = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    fast, slow = MaskedAdamW([w, b], **HP), MaskedAdamW([w_slow, b_slow], **HP)
    slow._update = lambda *a, **k: ops.masked_adamw_(*a, **k)  # not the op itself: every step goes through it
    h, p0 = torch.rand(7), w.detach().clone()
    for opt, (ww, bb) in ((fast, (w, b)), (slow, (w_slow, b_slow))):
        opt.set_rows({ww: torch.tensor([1, 4, 6]), bb: torch.tensor([0, 4])})
        opt.set_penalty({ww: (h, p0)}, 0.3)
    checks = _count_checks(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        gw, gb = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
        for ww, bb in ((w, b), (w_slow, b_slow)):
            if step % 2 == 0 or ww.grad is None:  # zero_grad(set_to_none=True): new tensors
                ww.grad, bb.grad = gw.clone(), gb.clone()
            else:  # gradients accumulated into the same tensors
                ww.grad.copy_(gw)
                bb.grad.copy_(gb)
        fast.step()
        slow.step()
        assert torch.equal(w.detach(), w_slow.detach()) and torch.equal(b.detach(), b_slow.detach())
    # two kernel calls per step (with and without the penalty); the fast optimizer checked each once
    assert checks[0] == 2 + 2 * 5


def test_direct_steps_still_catch_what_the_op_catches(monkeypatch):
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    opt.set_rows({w: torch.tensor([0, 2]), b: torch.tensor([0, 2])})
    w.grad, b.grad = torch.randn(w.shape), torch.randn(b.shape)
    opt.step()
    checks = _count_checks(monkeypatch)
    w.grad = w.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    w.grad = None  # a param without a gradient is skipped, through the op
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w.detach(), before) and checks[0] == 1
    w.grad = torch.randn(w.shape)
    opt.step()  # through the op: checks the tensors again
    opt.step()  # directly
    assert checks[0] == 2
    opt.param_groups[0]["lr"] = float("nan")  # the scalar checks run on every step
    with pytest.raises(ValueError, match="lr must be finite"):
        opt.step()
    assert checks[0] == 2


def test_rows_are_copied_by_set_rows():
    w, b = _layer()
    opt = MaskedAdamW([w], **HP)
    rows = torch.tensor([1, 3])
    opt.set_rows({w: rows})
    rows[0] = 5  # the caller's tensor, changed after the call
    w.grad = torch.randn(w.shape)
    before = w.detach().clone()
    opt.step()
    changed = (w.detach() != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [1, 3]


def test_direct_steps_follow_the_backend_of_the_moment(monkeypatch):
    w, _ = _layer()
    opt = MaskedAdamW([w], **HP)
    opt.set_rows({w: torch.tensor([0, 1])})
    w.grad = torch.randn(w.shape)
    ref = ops.registry.get_backend("reference")
    ran = []
    real = ref.kernels["masked_adamw_"]
    monkeypatch.setitem(ref.kernels, "masked_adamw_", lambda *a: (ran.append(1), real(*a)))
    with ops.use_backend("cpp"):
        opt.step()
        opt.step()
    assert ran == []
    with ops.use_backend("reference"):
        opt.step()
    assert ran == [1]


def test_dispatch_modes_see_every_step():
    """Under a TorchDispatchMode (as torch.compile's tracing and functionalization use) the op is dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    w, _ = _layer()
    opt = MaskedAdamW([w], **HP)
    opt.set_rows({w: torch.tensor([0, 1])})
    w.grad = torch.randn(w.shape)
    opt.step()  # checked: later steps would go directly to the kernel
    with Log() as log:
        opt.step()
    assert any("trust_fast.masked_adamw_" in n for n in log.names), log.names


def test_setting_the_same_rows_again_keeps_direct_steps(monkeypatch):
    """A loop that re-localizes every k steps hands the same rows to set_rows in between."""
    w, b = _layer()
    opt = MaskedAdamW([w, b], **HP)
    rows = {w: torch.tensor([1, 4]), b: torch.tensor([1, 4])}
    opt.set_rows(rows)
    checks = _count_checks(monkeypatch)
    for _ in range(3):
        w.grad, b.grad = torch.randn(w.shape), torch.randn(b.shape)
        opt.set_rows({p: r.clone() for p, r in rows.items()})  # equal rows, new tensors
        opt.step()
    assert checks[0] == 1
    opt.set_rows({w: torch.tensor([1, 5]), b: torch.tensor([1, 4])})  # changed: checked again
    before = w.detach().clone()
    opt.step()
    assert checks[0] == 2
    changed = (w.detach() != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [1, 5]
    opt.load_state_dict(opt.state_dict())  # new state tensors: the next step checks them again
    opt.set_rows({w: torch.tensor([1, 5]), b: torch.tensor([1, 4])})
    opt.step()
    assert checks[0] == 3


def test_triton_plan_follows_moved_tensors_and_new_hyperparameters():
    """The triton backend's prepared launches (reused across direct steps) re-read the params' and
    gradients' addresses and the hyperparameters on every call."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 (this run has a GPU)")
    w, b = _layer()
    w_slow, b_slow = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    fast, slow = MaskedAdamW([w, b], **HP), MaskedAdamW([w_slow, b_slow], **HP)
    slow._update = lambda *a, **k: ops.masked_adamw_(*a, **k)
    for opt, ww, bb in ((fast, w, b), (slow, w_slow, b_slow)):
        opt.set_rows({ww: torch.tensor([0, 3, 5]), bb: torch.tensor([2])})
    gen = torch.Generator().manual_seed(5)
    with ops.use_backend("triton"):
        for step in range(4):
            gw, gb = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
            for ww, bb in ((w, b), (w_slow, b_slow)):
                ww.grad, bb.grad = gw.clone(), gb.clone()
                if step == 2:  # the param's storage moves (as after .to() and back, or a reload)
                    ww.data = ww.data.clone()
            for opt in (fast, slow):
                opt.param_groups[0]["lr"] = HP["lr"] * (step + 1)  # a schedule
                opt.step()
            assert torch.equal(w.detach(), w_slow.detach()) and torch.equal(b.detach(), b_slow.detach())
    assert fast._plans[0][0] is not None  # the direct steps ran through a prepared plan


def test_set_rows_waits_for_the_device_a_fixed_number_of_times(monkeypatch):
    """On a GPU every data-dependent op (a boolean index, nonzero, item, tolist) waits for the device.
    set_rows looks for the rows selected for the first time in all params together, so its count of
    such ops does not grow with the number of params (the engine sets new rows every step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    waits = {aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default,
             aten.equal.default, aten.is_nonzero.default}
    seen: list[str] = []

    class CountWaits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            bool_index = func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
            if func in waits or bool_index:
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    real_tolist = torch.Tensor.tolist

    def counted_tolist(self):
        seen.append("tolist")
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def waits_of_set_rows(n_params: int) -> list[int]:
        ps = [torch.nn.Parameter(torch.randn(6, 3)) for _ in range(n_params)]
        opt = MaskedAdamW(ps, lr=0.1)
        counts = []
        # first selection, a mix of new and known rows, known rows only, the same rows again, fewer params
        for rows in ([0, 2], [2, 5], [5, 0], [5, 0], None):
            arg = {p: torch.tensor([1, 4]) for p in ps[:1]} if rows is None else {p: torch.tensor(rows) for p in ps}
            seen.clear()
            with CountWaits():
                opt.set_rows(arg)
            counts.append(len(seen))
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        return counts

    few, many = waits_of_set_rows(2), waits_of_set_rows(12)
    assert few == many, (few, many)
    # at most: comparing with the rows already set, the index check, counting the new rows
    assert max(many) <= 3 and many[3] == 1, many
