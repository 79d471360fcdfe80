"""Reductions for the kernels, written on ``tl.reduce`` with our own combine function.

``tl.sum`` (like ``tl.zeros``) is itself a ``@triton.jit`` library function: when triton was imported
before ``TRITON_INTERPRET=1`` was set (as in a test session that imports
trust_fast early), the interpreter cannot run it, while functions defined here
are decorated when the kernels are imported and so always match the mode.
"""

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def total(x):
    """Sum of a 1-D block (accumulated in x's dtype)."""
    return tl.reduce(x, 0, _add)
