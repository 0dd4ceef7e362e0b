"""segserve: LLM inference on a segment KV cache, served by Ray Serve.

The offline API is re-exported here so users write ``from segserve import LLM, SamplingParams``.
Imports are lazy: ``import segserve.kernels`` must not pull in the engine (and its
torch/transformers start-up cost) for code that only needs one layer.
"""

import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]


def _demote_checkout_on_sys_path() -> None:
    """Move this checkout's root to the end of ``sys.path``.

    The checkout's root is this package, so run from there (``python -m pytest``, ``python -m
    segserve.deploy.cli``; Ray also puts the driver's working directory on its workers' path)
    its folders import as top-level modules too, and would shadow installed packages of the
    same name: transformers imports Hugging Face's ``kernels`` package and got ours. At the
    end of the path they shadow nothing, and ``import segserve`` is unaffected.
    """
    root = os.path.realpath(os.path.dirname(__file__))
    ours = [p for p in sys.path if os.path.realpath(p or os.curdir) == root]
    if ours:
        sys.path[:] = [p for p in sys.path if p not in ours] + ours


_demote_checkout_on_sys_path()

if TYPE_CHECKING:
    from segserve.actors.config import EngineConfig
    from segserve.actors.llm import LLM
    from segserve.actors.outputs import CompletionOutput, RequestOutput
    from segserve.actors.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from segserve.actors.llm import LLM

        return LLM
    if name == "SamplingParams":
        from segserve.actors.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from segserve.actors import outputs

        return getattr(outputs, name)
    if name == "EngineConfig":
        from segserve.actors.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'segserve' has no attribute {name!r}")
