"""What every Triton op of the backend shares: the interpreter switch, dtype flags, the dot."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (read when the kernels are decorated): tests run the kernels under it on
# machines without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    from . import _interpreter

    _interpreter.apply()

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in float32; ``IEEE`` (float32 inputs) keeps exact float32 products,
    since tf32 would break greedy identity with HF in float32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
