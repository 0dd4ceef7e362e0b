"""EngineConfig: every knob of one engine (one replica group), in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str = "demo"  # an HF checkpoint dir, a .gguf file, "smollm2" (fetched) or "demo"
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "xpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    kernel_backend: str | None = None  # None: the device's default (see segserve.kernels)
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (CUDA + a graphable backend)
    block_size: int = 16
    kv_dtype: str = "auto"  # "auto" (the model's dtype) | "int8" (kernels/quant.py)
    cpu_threads: int | None = None  # CPU: torch threads; None: every core this process may use
    num_kv_blocks: int | None = None  # fixed pool size; overrides the memory budget below
    kv_cache_memory_gb: float = 2.0  # CPU: bytes for the KV pool
    gpu_memory_utilization: float = 0.85  # GPU: fraction of device memory for weights + KV
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048  # token budget per step (chunked prefill splits prompts)
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds requests that bring no seed of their own
    max_queue_len: int | None = None  # bound on waiting requests; None: unbounded
    # Tensor parallelism: ranks of the replica group, how they talk and how they start.
    tensor_parallel_size: int = 1
    communicator: str | None = None  # nccl | xccl | oneccl | gloo; None: the device's default
    tp_launcher: str = "ray"  # "ray" (actors in a placement group) | "processes" (local)
    collective_timeout_s: float = 300.0  # a collective that waits longer fails the group

    def __post_init__(self) -> None:
        from .communicator import check_backend, default_backend

        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        device_type = self.device.split(":")[0]
        if self.communicator is None:
            self.communicator = default_backend(device_type)
        check_backend(self.communicator, device_type)
        if self.tp_launcher not in ("ray", "processes"):
            raise ValueError(f"tp_launcher must be 'ray' or 'processes', got {self.tp_launcher!r}")
        if self.collective_timeout_s <= 0:
            raise ValueError("collective_timeout_s must be > 0")
        if self.kv_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_dtype must be 'auto' or 'int8', got {self.kv_dtype!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 64:
            # a beam group (up to 64 beams) must fit one step's budget
            raise ValueError(
                f"max_num_batched_tokens must be >= 64, got {self.max_num_batched_tokens}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be > 0")
