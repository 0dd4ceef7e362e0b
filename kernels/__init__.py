"""Fused ops behind one interface. Backends: ``reference`` (the oracle), ``cpu``; ``triton`` for
CUDA/XPU comes with the GPU work. This package imports nothing else of segserve."""

from __future__ import annotations

from .interface import AttentionMetadata, KernelBackend

__all__ = ["AttentionMetadata", "KernelBackend", "get_backend", "BACKENDS"]

BACKENDS = ("reference", "cpu")


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
    raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
