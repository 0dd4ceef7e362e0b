"""CPU backend. For now it is the reference; SlimAttention, int8 KV and fused element-wise ops
(design.md) replace these ops one by one, each tested against ``reference``."""

from __future__ import annotations

from .reference import ReferenceBackend


class CPUBackend(ReferenceBackend):
    name = "cpu"
