"""The op layer's Python API refuses bad arguments before any work: a TypeError or ValueError whose
one-line message names the op, the argument and its position; never an unrelated error from deep
inside, never a silent no-op. Non-finite saliency scores are refused naming their tensor, on every
backend and under torch.compile.

Value checks of well-typed tensors (shapes, dtypes, devices, index ranges) are tested in
test_ops_api.test_bad_arguments_name_the_argument, test_masked_adamw_bad_arguments and
test_hutchinson_bad_arguments.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest

import trust_fast.ops as ops

G = torch.ones(3, 4)
NAN, INF = float("nan"), float("inf")


def _adam_call(**change):
    """masked_adamw_ on one (3, 4) param, rows 0 and 2, with arguments replaced by `change`."""
    lists = dict(params=[torch.zeros(3, 4)], grads=[torch.ones(3, 4)], exp_avgs=[torch.zeros(2, 4)],
                 exp_avg_sqs=[torch.zeros(2, 4)], steps=[torch.zeros(2)], rows=[torch.tensor([0, 2])],
                 slots=[torch.tensor([0, 1])])
    keywords = dict(lr=1e-3)
    for k, v in change.items():
        (lists if k in lists else keywords)[k] = v
    return lambda: ops.masked_adamw_(*lists.values(), **keywords)


def _hutchinson_call(**change):
    args = dict(diags=[torch.zeros(3)], hz=[G], z=[G], rows=None, count=0)
    args.update(change)
    return lambda: ops.hutchinson_diag_(**args)


CASES = [
    # row_saliency: lists of tensors, the mode
    (lambda: ops.row_saliency([None]), TypeError, "row_saliency: tensors[0] must be a torch.Tensor, got NoneType"),
    (lambda: ops.row_saliency([G, 3.0]), TypeError, "row_saliency: tensors[1] must be a torch.Tensor, got float"),
    (lambda: ops.row_saliency(None), TypeError, "row_saliency: tensors must be a list of tensors, got NoneType"),
    (lambda: ops.row_saliency(G), TypeError, "row_saliency: tensors must be a list of tensors, got Tensor"),
    (lambda: ops.row_saliency([G], [None], "gw"), TypeError,
     "row_saliency: weights[0] must be a torch.Tensor, got NoneType"),
    (lambda: ops.row_saliency([G], G, "gw"), TypeError,
     "row_saliency: weights must be a list of tensors or None, got Tensor"),
    (lambda: ops.row_saliency([G], mode=None), TypeError,
     "row_saliency: mode must be a str, one of ('g', 'gw'), got NoneType"),
    (lambda: ops.row_saliency([G], mode="abs"), ValueError, "row_saliency: mode must be one of ('g', 'gw'), got 'abs'"),
    (lambda: ops.row_saliency([], mode="abs"), ValueError, "row_saliency: mode must be one of ('g', 'gw'), got 'abs'"),
    # select_rows: the scores, the row counts, the scalars
    (lambda: ops.select_rows(None, [3], 1.0), TypeError, "select_rows: scores must be a torch.Tensor, got NoneType"),
    (lambda: ops.select_rows([1.0, 2.0], [2], 1.0), TypeError, "select_rows: scores must be a torch.Tensor, got list"),
    (lambda: ops.select_rows(torch.rand(3), None, 1.0), TypeError,
     "select_rows: rows_per_tensor must be a list of integers, got NoneType"),
    (lambda: ops.select_rows(torch.rand(3), torch.tensor([3]), 1.0), TypeError,
     "select_rows: rows_per_tensor must be a list of integers, got Tensor"),
    (lambda: ops.select_rows(torch.rand(3), [1.5, 1.5], 1.0), TypeError,
     "select_rows: rows_per_tensor[0] must be an integer, got float"),
    (lambda: ops.select_rows(torch.rand(3), [2, True], 1.0), TypeError,
     "select_rows: rows_per_tensor[1] must be an integer, got bool"),
    (lambda: ops.select_rows(torch.rand(3), [3], "2"), TypeError, "select_rows: xi must be a number, got str"),
    (lambda: ops.select_rows(torch.rand(3), [3], None), TypeError, "select_rows: xi must be a number, got NoneType"),
    (lambda: ops.select_rows(torch.rand(3), [3], NAN), ValueError, "select_rows: xi must be finite, got nan"),
    (lambda: ops.select_rows(torch.rand(3), [3], 1.0, "0.5"), TypeError,
     "select_rows: max_fraction must be a number or None, got str"),
    (lambda: ops.select_rows(torch.rand(3), [3], 1.0, NAN), ValueError,
     "select_rows: max_fraction must be in [0, 1], got nan"),
    (lambda: ops.select_rows(torch.rand(3), [4, -1], 1.0), ValueError,
     "select_rows: rows_per_tensor[1] is negative (-1)"),
    # masked_adamw_: nine lists of tensors, six numbers; empty params with other lists not empty
    (_adam_call(params=None), TypeError, "masked_adamw_: params must be a list of tensors, got NoneType"),
    (_adam_call(grads=[None]), TypeError, "masked_adamw_: grads[0] must be a torch.Tensor, got NoneType"),
    (_adam_call(exp_avgs=torch.zeros(2, 4)), TypeError,
     "masked_adamw_: exp_avgs must be a list of tensors, got Tensor"),
    (_adam_call(slots=[[0, 1]]), TypeError, "masked_adamw_: slots[0] must be a torch.Tensor, got list"),
    (_adam_call(hess=[None], ref_params=[torch.zeros(3, 4)]), TypeError,
     "masked_adamw_: hess[0] must be a torch.Tensor, got NoneType"),
    (_adam_call(hess=[torch.zeros(3)], ref_params=7), TypeError,
     "masked_adamw_: ref_params must be a list of tensors or None, got int"),
    (_adam_call(lr="1e-3"), TypeError, "masked_adamw_: lr must be a number, got str"),
    (_adam_call(lr=None), TypeError, "masked_adamw_: lr must be a number, got NoneType"),
    (_adam_call(beta1=True), TypeError, "masked_adamw_: beta1 must be a number, got bool"),
    (_adam_call(lam=[0.5]), TypeError, "masked_adamw_: lam must be a number, got list"),
    (_adam_call(eps=INF), ValueError, "masked_adamw_: eps must be finite, got inf"),
    (_adam_call(params=[], grads=[torch.ones(3, 4)], exp_avgs=[], exp_avg_sqs=[], steps=[], rows=[], slots=[]),
     ValueError, "masked_adamw_: grads has 1 tensors but params has 0"),
    # hutchinson_diag_: four lists of tensors, the count; empty diags with other lists not empty
    (_hutchinson_call(diags=None), TypeError, "hutchinson_diag_: diags must be a list of tensors, got NoneType"),
    (_hutchinson_call(hz=[None]), TypeError, "hutchinson_diag_: hz[0] must be a torch.Tensor, got NoneType"),
    (_hutchinson_call(rows=[None]), TypeError, "hutchinson_diag_: rows[0] must be a torch.Tensor, got NoneType"),
    (_hutchinson_call(count=1.5), TypeError, "hutchinson_diag_: count must be an integer, got float"),
    (_hutchinson_call(count="1"), TypeError, "hutchinson_diag_: count must be an integer, got str"),
    (_hutchinson_call(count=-1), ValueError, "hutchinson_diag_: count must be >= 0, got -1"),
    (_hutchinson_call(diags=[]), ValueError, "hutchinson_diag_: hz has 1 tensors but diags has 0"),
    # rademacher_like and the backend registry
    (lambda: ops.rademacher_like([None]), TypeError,
     "rademacher_like: tensors[0] must be a torch.Tensor, got NoneType"),
    (lambda: ops.rademacher_like([G], generator=3), TypeError,
     "rademacher_like: generator must be a torch.Generator or None, got int"),
    (lambda: ops.rademacher_like([torch.zeros(2, dtype=torch.int64)]), TypeError,
     "rademacher_like: tensors[0] has dtype torch.int64; +-1 probes need a floating dtype"),
    (lambda: ops.use_backend(["cpp"]).__enter__(), TypeError, "a trust_fast backend name must be a str, got list"),
    (lambda: ops.backend_for(None), TypeError,
     "backend_for: device must be a torch.device or a str such as 'cuda:0', got NoneType"),
    (lambda: ops.backend_for("gpu0"), ValueError, "backend_for: device 'gpu0' is not a torch device"),
    (lambda: ops.available_backends(1.5), TypeError,
     "available_backends: device must be a torch.device or a str such as 'cuda:0', got float"),
]


@pytest.mark.parametrize("call,error,message", CASES, ids=[c[2].split(" must ")[0][:60] for c in CASES])
def test_bad_arguments_are_refused_naming_the_op_and_the_argument(call, error, message):
    with pytest.raises(error) as e:
        call()
    assert str(e.value) == message


def test_a_refused_masked_adamw_call_changes_nothing():
    params, m = [torch.zeros(3, 4)], [torch.zeros(2, 4)]
    for bad in (dict(lr="1e-3"), dict(grads=[None]), dict(hess=[None], ref_params=[torch.zeros(3, 4)])):
        with pytest.raises(TypeError):
            _adam_call(params=params, exp_avgs=m, **bad)()
        assert torch.equal(params[0], torch.zeros(3, 4)) and torch.equal(m[0], torch.zeros(2, 4))
    _adam_call(params=params, exp_avgs=m)()  # the same call with good arguments does update
    assert params[0][[0, 2]].ne(0).all() and params[0][1].eq(0).all()


def test_iterables_of_tensors_and_numpy_or_tensor_numbers_are_accepted():
    import numpy as np

    g = [torch.tensor([[1.0, -3.0], [2.0, 2.0]])]
    assert ops.row_saliency(tuple(g)).tolist() == [2.0, 2.0]
    assert ops.row_saliency(t for t in g).tolist() == [2.0, 2.0]
    scores = torch.tensor([0.0, 0.0, 0.0, 9.0, 1.0, 5.0])
    want = [[3], [1]]  # z-scores (1.73 for the 9; +-1 in the second tensor) above 0.5
    assert [r.tolist() for r in ops.select_rows(scores, (np.int64(4), 2), np.float32(0.5))] == want
    assert [r.tolist() for r in ops.select_rows(scores, [4, 2], torch.tensor(0.5), max_fraction=1)] == want


# ------------------------------------------------------------------ non-finite saliency scores

@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_select_rows_refuses_a_non_finite_score_naming_its_tensor(backend, bad):
    """Before, a tensor with a NaN score silently selected no rows (its z-scores were NaN)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 (this run has a GPU)")
    counts = [9, 0, 6, 1, 12]
    scores = torch.rand(sum(counts), generator=torch.Generator().manual_seed(0))
    scores[9 + 6 + 1 + 7] = bad  # row 7 of tensor 4
    want = f"select_rows: the scores of tensor 4 are not finite ({bad} at row 7); z-scores need finite scores"
    with ops.use_backend(backend):
        with pytest.raises(ValueError) as e:
            ops.select_rows(scores, counts, 1.0)
        assert str(e.value) == want
        with pytest.raises(ValueError) as e:  # the op itself, without the Python wrapper
            torch.ops.trust_fast.select_rows(scores, counts, 1.0, 0.5)
        assert str(e.value) == want
        scores[9] = NAN  # the first non-finite score is the one named: row 0 of tensor 2 (tensor 1 has none)
        with pytest.raises(ValueError, match=r"^select_rows: the scores of tensor 2 are not finite \(nan at row 0\)"):
            ops.select_rows(scores, counts, 1.0)


def test_select_rows_refuses_a_non_finite_score_under_torch_compile():
    def pick(scores):
        return [r + 0 for r in ops.select_rows(scores, [3, 2], 1.0)]

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(pick, fullgraph=True, backend="aot_eager")
        assert [r.tolist() for r in compiled(torch.tensor([0.0, 0.0, 9.0, 1.0, 1.0]))] == [[2], []]
        with pytest.raises(ValueError, match=r"the scores of tensor 1 are not finite \(inf at row 1\)"):
            compiled(torch.tensor([0.0, 0.0, 9.0, 1.0, INF]))
