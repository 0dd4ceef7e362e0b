"""Fused ops behind one interface. Backends: ``reference`` (the oracle), ``cpu``, ``triton`` (CUDA
and XPU; imported only when asked for, so CPU installs need no triton). This package imports
nothing else of segserve."""

from __future__ import annotations

import logging

from .interface import (
    AttentionMetadata,
    KernelBackend,
    LayerKV,
    prompt_group_start_from_tables,
    prompt_group_starts,
)
from .quant import KV_DTYPES, kv_storage_dtype

__all__ = [
    "AttentionMetadata",
    "KernelBackend",
    "LayerKV",
    "KV_DTYPES",
    "kv_storage_dtype",
    "get_backend",
    "BACKENDS",
    "prompt_group_starts",
    "prompt_group_start_from_tables",
]

BACKENDS = ("reference", "cpu", "triton")


def get_backend(name: str | None = None, device: str = "cpu") -> KernelBackend:
    """The backend called ``name``, or the default one for ``device`` when ``name`` is None:
    ``cpu`` on the CPU, ``triton`` on CUDA and XPU (``reference``, with a warning, where triton
    does not import)."""
    if name is None:
        if device == "cpu":
            name = "cpu"
        else:
            try:
                import triton  # noqa: F401
            except ImportError:
                logging.getLogger(__name__).warning(
                    "triton is not installed: %s runs the slow 'reference' kernels", device)
                name = "reference"
            else:
                name = "triton"
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend()
    if name == "cpu":
        from .cpu import CPUBackend

        return CPUBackend()
    if name == "triton":
        try:
            from .triton import TritonBackend
        except ImportError as e:
            raise ValueError(
                f"kernel backend 'triton' needs the triton package (pip install triton): {e}"
            ) from e

        return TritonBackend()
    raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
