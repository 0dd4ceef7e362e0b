"""Fused ops behind one interface. Backends: ``reference`` (the oracle), ``cpu``, ``triton`` (CUDA
and XPU; imported only when asked for, so CPU installs need no triton). This package imports
nothing else of segserve."""

from __future__ import annotations

from .interface import (
    AttentionMetadata,
    KernelBackend,
    prompt_group_start_from_tables,
    prompt_group_starts,
)

__all__ = [
    "AttentionMetadata",
    "KernelBackend",
    "get_backend",
    "BACKENDS",
    "prompt_group_starts",
    "prompt_group_start_from_tables",
]

BACKENDS = ("reference", "cpu", "triton")


def get_backend(name: str | None = None, device: str = "cpu") -> KernelBackend:
    """The backend called ``name``, or the default one for ``device`` when ``name`` is None."""
    if name is None:
        name = "cpu" if device == "cpu" else "reference"
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
