"""Load a checkpoint: a local HF directory (config, (sharded) safetensors, tokenizer) or a GGUF
file (models/gguf.py turns it into HF-named tensors and an HF config, and this file does the rest).

Weights are fused while loading (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and sliced for the
tensor-parallel rank, so a rank never materialises more than its shard. ``model`` is a
directory, a ``.gguf`` file, ``"demo"`` (the built-in demo model) or a named model of
models/fetch.py (``"smollm2"``), fetched into the segserve cache on first use.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from segserve.kernels import KernelBackend

from .llama import AllReduce, LlamaForCausalLM
from .spec import ModelSpec

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Show a progress bar from this checkpoint size on; tiny test models stay quiet.
PROGRESS_MIN_BYTES = 256 * 2**20


class ModelLoadError(ValueError):
    """The model directory is missing, incomplete, corrupt or of an unsupported kind."""


def resolve_model_path(model: str) -> Path:
    """The checkpoint a model argument names: an HF directory or a ``.gguf`` file. Named models
    are fetched (or built, for the demo) into the segserve cache first."""
    from .demo import DEMO_MODEL_NAME, ensure_demo_model
    from .fetch import NAMED_MODELS, fetch_model
    from .gguf import GGUF_SUFFIX, is_gguf

    if model == DEMO_MODEL_NAME:
        return ensure_demo_model()
    if model in NAMED_MODELS:
        return fetch_model(model)
    path = Path(model).expanduser()
    if is_gguf(path):
        return path
    if not path.is_dir():
        raise ModelLoadError(
            f"model {str(path)!r} does not exist (segserve loads local checkpoints: a directory "
            f"with config.json and *.safetensors, a {GGUF_SUFFIX} file, 'demo', or a named "
            f"model: {', '.join(NAMED_MODELS)})"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelLoadError(f"model directory {str(path)!r} has no config.json"
                             + (f" (and {len(ggufs)} GGUF files: name one)" if ggufs else ""))
    return path


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_spec(path: Path) -> ModelSpec:
    from .gguf import is_gguf, load_gguf_spec_config

    if is_gguf(path):
        config = load_gguf_spec_config(path)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (ValueError, OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
    try:
        return ModelSpec.from_hf_config(config)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e


def load_tokenizer(path: Path) -> Any | None:
    """The HF fast tokenizer, or None when the checkpoint ships none (token-id prompts only)."""
    from .gguf import is_gguf, load_gguf_tokenizer

    if is_gguf(path):
        return load_gguf_tokenizer(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        logger.warning("%s has no tokenizer files: only token-id prompts will work", path)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # tokenizer loaders raise many types; name the file either way
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {e}") from e


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"corrupt index {index}: {e}") from e
        files = sorted({path / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    return files


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _target(name: str) -> tuple[str, str | None] | None:
    """Map an HF tensor name to (our parameter name, fused part or None)."""
    if name.startswith("model.embed_tokens."):
        return name.removeprefix("model."), None
    if name.startswith("model.norm."):
        return name.removeprefix("model."), None
    if name.startswith("lm_head."):
        return name, None
    m = _LAYER.match(name)
    if m is None:
        return None
    layer, rest = m.groups()
    prefix = f"layers.{layer}."
    for part in ("q", "k", "v"):
        if rest.startswith(f"self_attn.{part}_proj."):
            return prefix + "self_attn.qkv_proj." + rest.rsplit(".", 1)[1], part
    for part in ("gate", "up"):
        if rest.startswith(f"mlp.{part}_proj."):
            return prefix + "mlp.gate_up_proj." + rest.rsplit(".", 1)[1], part
    if rest.startswith("self_attn.rotary_emb"):
        return None  # some old checkpoints carry inv_freq buffers
    return prefix + rest, None


class _Placer:
    """Copies checkpoint tensors into the (fused, sharded) parameters and records coverage."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        spec, tp = model.spec, model.tp_size
        self.rank, self.tp = model.tp_rank, tp
        hd = spec.head_dim
        q, kv = spec.num_heads // tp * hd, spec.num_kv_heads // tp * hd
        inter = spec.intermediate_size // tp
        # Row offsets of each fused part inside this rank's fused parameter.
        self.parts = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter),
                      "up": (inter, inter)}
        self.loaded: set[tuple[str, str | None]] = set()

    def place(self, name: str, source: Any) -> None:
        """Copy checkpoint tensor ``name`` into its parameter. ``source`` is a tensor, or a
        safetensors slice from which only this rank's part is read."""
        target = _target(name)
        if target is None:
            return
        pname, part = target
        if pname not in self.params:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
        param = self.params[pname]
        shape = tuple(source.get_shape()) if hasattr(source, "get_shape") else \
            tuple(source.shape)
        if part is not None:
            offset, size = self.parts[part]
            tensor = self._read(source, shape, 0, self.rank * size, size)
            dest = param.data.narrow(0, offset, size)
        elif pname.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel
            tensor = self._read(source, shape, 1, self.rank * param.shape[1], param.shape[1])
            dest = param.data
        elif pname.endswith(("o_proj.bias", "down_proj.bias")):
            # added once after the all-reduce: rank 0 holds it, the others hold zeros
            tensor = self._read(source, shape, None, 0, 0)
            if self.rank:
                tensor = torch.zeros_like(tensor)
            dest = param.data
        elif pname.startswith("lm_head."):  # vocab-parallel, padded
            tensor = self._vocab_rows(source, shape, param.shape[0])
            dest = param.data
        else:
            tensor = self._read(source, shape, None, 0, 0)
            dest = param.data
        if tensor.shape != dest.shape:
            raise ModelLoadError(
                f"tensor {name!r} has shape {shape}, expected {tuple(param.shape)}"
                + (f" (sliced for rank {self.rank} of {self.tp})" if self.tp > 1 else "")
            )
        dest.copy_(tensor)
        self.loaded.add((pname, part))

    def _read(self, source: Any, shape: tuple, dim: int | None, start: int,
              size: int) -> torch.Tensor:
        """The whole tensor (``dim`` None, or one rank), or ``size`` entries of ``dim`` from
        ``start``; a safetensors slice reads just those bytes."""
        if dim is None or self.tp == 1 or len(shape) <= dim or shape[dim] < start + size:
            return source[:] if not isinstance(source, torch.Tensor) else source
        if isinstance(source, torch.Tensor):
            return source.narrow(dim, start, size)
        return source[start : start + size] if dim == 0 else source[:, start : start + size]

    def _vocab_rows(self, source: Any, shape: tuple, rows: int) -> torch.Tensor:
        """This rank's rows of a ``[vocab, hidden]`` tensor, zero-padded past the vocabulary."""
        if self.tp == 1:
            return self._read(source, shape, None, 0, 0)
        start = self.rank * rows
        have = max(0, min(rows, shape[0] - start))
        part = source[start : start + have] if have else source[:0]
        if have == rows:
            return part
        return torch.cat([part, part.new_zeros(rows - have, *shape[1:])])

    def finish(self) -> None:
        spec = self.model.spec
        if spec.tie_word_embeddings or ("lm_head.weight", None) not in self.loaded:
            if not spec.tie_word_embeddings:
                raise ModelLoadError("checkpoint has no lm_head.weight and embeddings are not tied")
            emb = self.params["embed_tokens.weight"].data
            head = self.params["lm_head.weight"]
            head.data.copy_(self._vocab_rows(emb, tuple(emb.shape), head.shape[0]))
            self.loaded.add(("lm_head.weight", None))
        missing = []
        for pname in self.params:
            fused = [p for (n, p) in self.loaded if n == pname]
            if pname.endswith("qkv_proj.weight") or pname.endswith("qkv_proj.bias"):
                need = {"q", "k", "v"}
            elif "gate_up_proj" in pname:
                need = {"gate", "up"}
            else:
                need = {None}
            if not need <= set(fused):
                missing.append(pname)
        if missing:
            raise ModelLoadError(f"checkpoint is missing weights for: {', '.join(missing[:8])}"
                                 + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(HF name, lazy slice, bytes in the file) for every tensor of the (sharded) checkpoint:
    indexing the slice reads only the rows or columns asked for."""
    from safetensors import SafetensorError, safe_open

    sizes = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    sl = f.get_slice(name)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    yield name, sl, numel * sizes.get(sl.get_dtype(), 2)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"corrupt or unreadable safetensors file {file}: {e}") from e


class _Cast:
    """A tensor or slice whose reads come back in ``dtype``."""

    def __init__(self, source: Any, dtype: torch.dtype) -> None:
        self.source, self.dtype = source, dtype

    def get_shape(self) -> list[int]:
        s = self.source
        return list(s.shape) if isinstance(s, torch.Tensor) else s.get_shape()

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.source[index].to(self.dtype)


def load_model(
    path: Path,
    spec: ModelSpec,
    backend: KernelBackend,
    dtype: torch.dtype,
    device: torch.device,
    tp_rank: int = 0,
    tp_size: int = 1,
    all_reduce: AllReduce | None = None,
    max_positions: int = 0,
) -> LlamaForCausalLM:
    from .gguf import gguf_tensors, is_gguf

    if is_gguf(path):
        total, tensors = path.stat().st_size, gguf_tensors(path)
    else:
        files = safetensors_files(path)
        total, tensors = sum(f.stat().st_size for f in files), _safetensors_tensors(files)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, backend, tp_rank, tp_size, all_reduce)
    model = model.to_empty(device=device).to(dtype)
    placer = _Placer(model)
    progress = None
    if total >= PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        progress = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}")
    for name, tensor, nbytes in tensors:
        placer.place(name, _Cast(tensor, dtype))
        if progress is not None:
            progress.update(nbytes)
    if progress is not None:
        progress.close()
    placer.finish()
    model.init_rope(max(max_positions, spec.max_position_embeddings), device)
    model.pack_weights()
    return model
