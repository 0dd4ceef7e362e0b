"""The engine and (later) its Ray actors: segment KV manager, scheduler, sampler, engine loop,
model runner. Nothing here imports Ray Serve."""

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import EngineCore, QueueFull
from .kv_manager import KVMetrics, NoFreeBlocks, SegmentKVManager
from .llm import LLM
from .outputs import CompletionOutput, Delta, RequestOutput, TokenLogprob
from .sampling_params import SamplingParams

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "Delta",
    "EngineConfig",
    "EngineCore",
    "KVMetrics",
    "LLM",
    "NoFreeBlocks",
    "QueueFull",
    "RequestOutput",
    "SamplingParams",
    "SegmentKVManager",
    "TokenLogprob",
]
