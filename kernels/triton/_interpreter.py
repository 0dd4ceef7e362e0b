"""Fixes for bugs of Triton's CPU interpreter (``TRITON_INTERPRET=1``), applied only when it is
on, so the interpreter checks the same arithmetic the GPU does.

The interpreter keeps bfloat16 as raw uint16 (triton 3.6 to 3.9). (1) Its float32 -> bfloat16
conversion truncates (the GPU rounds to nearest even), so every rounding step of a kernel would
drift from torch's. (2) ``tl.dot`` multiplies the raw uint16 integers; bf16 operands are widened
to float32 here, which is exact, as tensor cores' bf16 products are.
(3) Triton 3.6 turns a scalar tensor into a loop bound with ``int()`` of a 1-element array, which
NumPy >= 2.4 refuses; 3.9 squeezes it first, and so does this.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl


def apply() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "_segserve_bf16_fix", False):
        return
    convert = interpreter._convert_float
    handle = interpreter.TensorHandle

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(np.asarray(data, dtype=np.float32))
            rounded[nan] = (rounded[nan] & 0x8000) | 0x7FC0
            return rounded.reshape(np.shape(data))
        return convert(data, input_dtype, output_dtype, rounding_mode)

    def widen(x):
        if x.dtype.scalar == tl.bfloat16:
            wide = convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return handle(wide, tl.float32)
        return x

    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._convert_float = convert_float
    interpreter.InterpreterBuilder.create_dot = create_dot_bf16
    interpreter._segserve_bf16_fix = True
