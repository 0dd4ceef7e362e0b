"""The service's configuration: which models run on which pools, and how the ingress behaves.

This is the ``args`` block of a Ray Serve config file (``import_path:
segserve.deploy.app:build_app``). Serve validates ``args`` against ``ServiceConfig`` because
``build_app`` is annotated with it, so a bad field fails ``serve run``/``serve deploy`` with a
message naming it. Ports are Serve's own (``http_options.port``, ``grpc_options.port``):
``load_serve_file`` checks those too, for ``segserve serve``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..actors.config import EngineConfig

Device = Literal["cpu", "cuda", "xpu"]
ACCELERATORS = ("cuda", "xpu")


class _Strict(BaseModel):
    # A misspelt key must fail loudly, not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    # '#' delimits Serve replica ids, so it cannot appear in a deployment name.
    name: str = Field(pattern=r"^[^#\s]+$", description="the id clients send as `model`")
    path: str = Field(
        "demo", description="a local HF checkpoint directory or .gguf file, a named model "
        "('smollm2', fetched on first use), or 'demo'")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    kv_dtype: Literal["auto", "int8"] = Field(
        "auto",
        description="KV cache dtype on pools that don't set their own; 'auto' = the model dtype",
    )
    max_model_len: int | None = Field(None, ge=1)
    pools: list[str] | None = Field(
        None, min_length=1, description="pools that serve it; default: all"
    )
    tool_parser: Literal["auto", "hermes", "llama3_json", "mistral", "none"] = Field(
        "auto", description="how tool calls are read from replies; auto: from the chat template"
    )


class AutoscalingConfig(_Strict):
    """Scale a pool on KV pressure (see deploy/autoscaling.py)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    scale_up_kv_utilization: float = Field(0.8, gt=0, le=1)
    scale_up_waiting_per_replica: float = Field(1.0, gt=0)
    scale_down_kv_utilization: float = Field(0.3, ge=0, lt=1)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(15.0, gt=10)  # Serve wants > its 10 s interval

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        if self.scale_down_kv_utilization >= self.scale_up_kv_utilization:
            raise ValueError("scale_down_kv_utilization must be < scale_up_kv_utilization")
        return self


class PoolConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    device: Device
    tensor_parallel_size: int = Field(
        1, ge=1, description="ranks per replica group: one replica spans this many devices "
        "(GPUs, or CPU ranks), started by Ray in one placement group")
    communicator: Literal["nccl", "xccl", "oneccl", "gloo"] | None = Field(
        None, description="the replica group's collectives; default: nccl on cuda, xccl on "
        "xpu, gloo on cpu (oneccl: our oneCCL binding, gloo where it cannot load)")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="how a replica group's ranks are placed on nodes")
    num_replicas: int | None = Field(None, ge=1, description="fixed replicas (or autoscaling)")
    autoscaling: AutoscalingConfig | None = None
    # KV memory: exactly one of these may be set; none takes the device's default.
    kv_cache_memory_gb: float | None = Field(None, gt=0, description="CPU: bytes for KV")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    block_size: int = Field(16, ge=1)
    kv_dtype: Literal["auto", "int8"] | None = Field(
        None,
        description="KV cache dtype of this pool (default: the model's kv_dtype); int8 stores "
        "one scale per token and head and about halves KV bytes (cpu/reference backends)",
    )
    max_num_batched_tokens: int = Field(2048, ge=64)
    max_num_seqs: int = Field(128, ge=1)
    max_queue_len: int = Field(256, ge=1, description="waiting requests before 429")
    kernel_backend: str | None = None
    cpus_per_replica: float = Field(1.0, gt=0)
    # Spill (auto device preference): the pool counts as saturated when every replica has
    # at least this many waiting requests or this KV utilization.
    spill_waiting_requests: int = Field(1, ge=1)
    spill_kv_utilization: float = Field(0.95, gt=0, le=1)
    engine_process: bool | None = Field(
        None,
        description="step the engine in a child process of its replica (actors/"
        "engine_process.py), so Ray's, Serve's and the ingress's threads never wait for its "
        "GIL, nor it for theirs. Default: on for cuda/xpu pools with tensor_parallel_size 1; "
        "a replica group (tensor_parallel_size > 1) steps in-process",
    )
    graceful_shutdown_timeout_s: float = Field(
        600.0, ge=0,
        description="a replica being stopped (scale-down, rolling update, shutdown) takes no "
        "new requests and lets its running ones finish for up to this long",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_size(self) -> PoolConfig:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        sizes = [self.kv_cache_memory_gb, self.gpu_memory_utilization, self.num_kv_blocks]
        if sum(s is not None for s in sizes) > 1:
            raise ValueError(
                "set at most one of kv_cache_memory_gb, gpu_memory_utilization, num_kv_blocks"
            )
        if self.engine_process and self.tensor_parallel_size > 1:
            raise ValueError("engine_process needs tensor_parallel_size 1: a replica group's "
                             "ranks are Ray actors, which the engine's process cannot drive")
        if self.device == "cpu" and self.gpu_memory_utilization is not None:
            raise ValueError("gpu_memory_utilization applies to cuda/xpu pools only")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.communicator is not None:
            from segserve.actors.communicator import check_backend

            check_backend(self.communicator, self.device)
        return self

    @property
    def is_accelerator(self) -> bool:
        return self.device in ACCELERATORS

    @property
    def uses_engine_process(self) -> bool:
        if self.engine_process is not None:
            return self.engine_process
        return self.is_accelerator and self.tensor_parallel_size == 1


class IngressConfig(_Strict):
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>`")
    api_key_env: str | None = Field(None, description="read the API key from this env var")
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(1024, ge=1)
    request_timeout_s: float | None = Field(
        600.0, gt=0,
        description="each request's deadline from its arrival: past it the request is aborted "
        "and the client gets 504 / DEADLINE_EXCEEDED (null: none)",
    )  # fmt: skip
    engine_in_ingress: bool = Field(
        False,
        description="one model on one pool only: run the engine inside the ingress replica, "
        "one deployment sized and scaled as the pool (its num_replicas or autoscaling; the "
        "ingress's num_replicas is not used). Saves a Ray hop per request and per streamed "
        "token; a replica's /metrics then shows its own engine only. A replica that dies "
        "takes its requests with it: nothing retries them on another",
    )
    max_body_bytes: int = Field(
        32 * 2**20, ge=2**16,
        description="an HTTP request body larger than this is refused with 413 before it is "
        "read whole (a 128k-token prompt is ~0.5 MB of text)",
    )  # fmt: skip
    trust_request_chat_template: bool = Field(
        False,
        description="render a chat template a request sends (`chat_template`, as vLLM's "
        "--trust-request-chat-template). Off by default: a template is code the ingress runs, "
        "and Jinja's sandbox bounds neither its time nor its memory ('x' * 10**10)",
    )
    api_key_cache_salt: str | None = Field(
        None, min_length=1, max_length=128,
        description="prefix-cache salt of every request made with the API key: its cached "
        "prompts are never shared with requests that lack the key; a request's own "
        "cache_salt is kept apart under it",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_key(self) -> IngressConfig:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("set api_key or api_key_env, not both")
        if self.api_key == "":
            raise ValueError("api_key must not be empty")
        if self.api_key_cache_salt is not None and self.api_key is None and not self.api_key_env:
            raise ValueError("api_key_cache_salt needs api_key or api_key_env")
        return self


class ServiceConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1)
    pools: list[PoolConfig] = Field(min_length=1)
    ingress: IngressConfig = IngressConfig()

    @model_validator(mode="after")
    def _references(self) -> ServiceConfig:
        pool_names = [p.name for p in self.pools]
        model_names = [m.name for m in self.models]
        for kind, names in (("pool", pool_names), ("model", model_names)):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"duplicate {kind} name(s): {sorted(dup)}")
        for m in self.models:
            unknown = set(m.pools or []) - set(pool_names)
            if unknown:
                raise ValueError(
                    f"model {m.name!r} names unknown pool(s) {sorted(unknown)}; "
                    f"pools are {pool_names}"
                )
            for pool in self.pools_for(m):
                if pool.tensor_parallel_size > 1:
                    _check_split(m, pool)
        if self.ingress.engine_in_ingress and self.single_pool() is None:
            raise ValueError("ingress.engine_in_ingress needs exactly one model served on "
                             "exactly one pool")
        return self

    def single_pool(self) -> tuple[ModelConfig, PoolConfig] | None:
        """The one (model, pool) pair of a service that has only one, else None."""
        if len(self.models) != 1:
            return None
        pools = self.pools_for(self.models[0])
        return (self.models[0], pools[0]) if len(pools) == 1 else None

    def pools_for(self, model: ModelConfig) -> list[PoolConfig]:
        wanted = model.pools
        return [p for p in self.pools if wanted is None or p.name in wanted]

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def _check_split(model: ModelConfig, pool: PoolConfig) -> None:
    """A tensor_parallel_size that cannot split the model fails here, when the model's config
    can be read without fetching anything; otherwise at replica start, before any rank
    starts."""
    from pathlib import Path

    path = Path(model.path)
    if model.path == "demo":
        from segserve.models import resolve_model_path

        path = resolve_model_path("demo")
    elif not path.exists():
        return
    from segserve.models import load_spec

    try:
        spec = load_spec(path)
    except Exception:  # noqa: BLE001 - an unreadable model fails with its own error at start
        return
    try:
        spec.check_tensor_parallel(pool.tensor_parallel_size)
    except ValueError as e:
        raise ValueError(f"pool {pool.name!r} with model {model.name!r}: {e}") from None


def engine_config(model: ModelConfig, pool: PoolConfig) -> EngineConfig:
    """The engine of one (model, pool) replica."""
    dtype = model.dtype
    if dtype == "auto":
        # bf16 halves the bytes each decode step reads on accelerators; CPUs without bf16
        # matmul units are faster (and exact) in fp32.
        dtype = "bfloat16" if pool.is_accelerator else "float32"
    memory: dict[str, Any] = {}
    if pool.kv_cache_memory_gb is not None:
        memory["kv_cache_memory_gb"] = pool.kv_cache_memory_gb
    if pool.gpu_memory_utilization is not None:
        memory["gpu_memory_utilization"] = pool.gpu_memory_utilization
    if pool.num_kv_blocks is not None:
        memory["num_kv_blocks"] = pool.num_kv_blocks
    return EngineConfig(
        model=model.path,
        device=pool.device,
        dtype=dtype,
        kernel_backend=pool.kernel_backend,
        block_size=pool.block_size,
        kv_dtype=pool.kv_dtype or model.kv_dtype,
        # A CPU replica runs as many threads as the CPUs Ray reserved for it.
        cpu_threads=max(1, round(pool.cpus_per_replica)) if pool.device == "cpu" else None,
        max_model_len=model.max_model_len,
        max_num_seqs=pool.max_num_seqs,
        max_num_batched_tokens=pool.max_num_batched_tokens,
        max_queue_len=pool.max_queue_len,
        tensor_parallel_size=pool.tensor_parallel_size,
        communicator=pool.communicator,
        **memory,
    )


# Serve accepts both spellings of an import path.
BUILD_APP_PATHS = ("segserve.deploy.app:build_app", "segserve.deploy.app.build_app")


class ConfigError(ValueError):
    """A config file that does not validate; the message names the bad field."""


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        lines.append(f"{where or '<root>'}: {e['msg']}")
    return "; ".join(lines)


def parse_service_config(args: dict[str, Any], where: str = "args") -> ServiceConfig:
    try:
        return ServiceConfig.model_validate(args)
    except ValidationError as e:
        raise ConfigError(f"invalid segserve config: {format_validation_error(e, where)}") from e


def load_serve_file(path: str | Path) -> tuple[dict[str, Any], list[ServiceConfig]]:
    """Read a Serve config file of ours: Serve's own schema (ports, applications) validated by
    Ray's ``ServeDeploySchema``, and each segserve application's ``args`` by ours."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping (Serve's config format)")
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e)}") from e
    services = []
    for i, app in enumerate(raw["applications"]):
        if app.get("import_path") not in BUILD_APP_PATHS:
            raise ConfigError(f"{path}: applications.{i}.import_path must be "
                              f"{BUILD_APP_PATHS[0]}, not {app.get('import_path')!r}")  # fmt: skip
        services.append(parse_service_config(app.get("args") or {}, f"applications.{i}.args"))
    return raw, services
