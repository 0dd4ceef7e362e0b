"""segserve: LLM inference on a segment KV cache, served by Ray Serve.

The offline API is re-exported here so users write ``from segserve import LLM, SamplingParams``.
Imports are lazy: ``import segserve.kernels`` must not pull in the engine (and its
torch/transformers start-up cost) for code that only needs one layer.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]

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
