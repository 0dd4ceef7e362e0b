"""Load a GGUF checkpoint (llama.cpp's single-file format) through the ``gguf`` package.

A GGUF file is turned into what an HF directory gives the rest of the loader: an HF config
(built from the file's ``{arch}.*`` metadata, then read by ``ModelSpec.from_hf_config`` as any
config.json is), HF-named float32 tensors (dequantized, with llama.cpp's Q/K row permutation
undone) that ``loader.load_model`` places into the fused, per-rank parameters, and the tokenizer
with its chat template, which transformers converts from the file's ``tokenizer.*`` metadata.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loader import ModelLoadError

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# general.architecture -> the HF class whose defaults apply. llama.cpp writes Mistral models as
# "llama" (it ignores their sliding window); "mistral" is taken from writers that say so.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# llama.cpp's converter permutes the Q/K rows of "llama" files for its interleaved ("NORM")
# RoPE; Qwen2 uses the NEOX rotation, which is HF's, and is stored as is. "mistral" files are
# read unpermuted, as HF's GGUF loader reads them (llama.cpp itself writes Mistral as "llama").
_PERMUTED_QK = {"llama"}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def hf_tensor_name(name: str) -> str:
    """The HF name of a GGUF tensor; ModelLoadError names a tensor we have no place for."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.match(name)
    if m is not None and m.group(2) in _LAYER_NAMES:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    if name == "rope_freqs.weight":
        raise ModelLoadError(
            "GGUF tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) is not "
            "supported yet"
        )
    raise ModelLoadError(f"GGUF tensor {name!r} has no place in a Llama-family model")


def unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` (convert_hf_to_gguf.py): within each head, rows were
    reordered from HF's rotate-half layout to interleaved pairs. Works on weights and biases."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----- reading ---------------------------------------------------------------------------------
def _checked_reader_class() -> type:
    from gguf import GGUFReader

    class CheckedReader(GGUFReader):
        """GGUFReader that names the tensor a truncated file cuts off (the plain reader fails
        on a numpy reshape that names nothing)."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            size = len(self.data)
            for field in fields:
                try:
                    _, name, _, dims, raw_type, offset = field.parts
                except (ValueError, TypeError):  # another gguf release's layout: no check
                    break
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                except (ValueError, KeyError):
                    raise ModelLoadError(
                        f"GGUF tensor {bytes(name).decode(errors='replace')!r} has unknown type "
                        f"id {int(raw_type[0])}"
                    ) from None
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise ModelLoadError(
                        f"GGUF tensor {bytes(name).decode(errors='replace')!r} ends at byte {end} "
                        f"but the file has {size} bytes: the file is truncated"
                    )
            super()._build_tensors(start_offs, fields)

    return CheckedReader


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> Any:
    # The reader parses every metadata entry (the ~50k tokenizer strings take seconds), and the
    # spec, the tokenizer and the weights each ask for it: keep the last few files open (memmap).
    return _checked_reader_class()(path)


def open_gguf(path: Path) -> Any:
    """The file's ``gguf.GGUFReader``; a corrupt or truncated file gets a ModelLoadError."""
    try:
        stat = path.stat()
        return _open(str(path), stat.st_mtime_ns, stat.st_size)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, TypeError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): "
                             f"{type(e).__name__}: {e}") from e


def _field(reader: Any, key: str, default: Any = None, required: bool = False) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ModelLoadError(f"GGUF metadata key {key!r} is missing")
        return default
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"GGUF metadata key {key!r} is unreadable: {e}") from e


def architecture(reader: Any) -> str:
    arch = _field(reader, "general.architecture", required=True)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} (general.architecture); segserve loads "
            f"{', '.join(ARCHITECTURES)}"
        )
    return arch


def _rope_parameters(reader: Any, arch: str) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": float(_field(reader, f"{arch}.rope.freq_base",
                                                         10000.0))}
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return {"rope_type": "default", **params}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor), **params}
    if kind == "yarn":
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if factor is None or original is None:
            raise ModelLoadError(f"yarn RoPE needs {arch}.rope.scaling.factor and "
                                 f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(original), **params}
    raise ModelLoadError(f"unsupported RoPE scaling {kind!r} ({arch}.rope.scaling.type)")


def hf_config(reader: Any) -> Any:
    """An HF config (LlamaConfig, MistralConfig or Qwen2Config) from the file's metadata."""
    import transformers

    arch = architecture(reader)

    def need(key: str) -> Any:
        return _field(reader, f"{arch}.{key}", required=True)

    tensor_names = {t.name for t in reader.tensors}
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts (hybrid models): ours are uniform
        if len(set(kv_heads)) != 1:
            raise ModelLoadError(f"{arch}.attention.head_count_kv varies by layer: {kv_heads}")
        kv_heads = kv_heads[0]
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rotary = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ModelLoadError(f"partial RoPE ({arch}.rope.dimension_count {rotary} < head "
                             f"dim {head_dim}) is not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None and tokens is not None:
        vocab = len(tokens.data)  # one entry per token string
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise ModelLoadError("GGUF file has no token_embd.weight tensor")
        vocab = int(embd.shape[-1])
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    kwargs: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[arch]],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_parameters=_rope_parameters(reader, arch),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    if arch == "qwen2":
        if head_dim != hidden // heads:
            raise ModelLoadError(f"qwen2 needs head dim = hidden / heads, got {head_dim}")
        return transformers.Qwen2Config(**kwargs)
    kwargs["head_dim"] = head_dim
    if arch == "mistral":
        return transformers.MistralConfig(
            sliding_window=_field(reader, f"{arch}.attention.sliding_window"), **kwargs)
    bias = "blk.0.attn_q.bias" in tensor_names
    return transformers.LlamaConfig(attention_bias=bias, **kwargs)


def load_gguf_spec_config(path: Path) -> Any:
    return hf_config(open_gguf(path))


def load_gguf_tokenizer(path: Path) -> Any | None:
    """transformers' own conversion of the file's tokenizer (vocab, merges, special tokens,
    chat template), or None when the file carries none (token-id prompts only).

    The conversion takes seconds (SmolLM2: ~8 s on 2 cores) and every process that serves the
    model needs it, so its result is saved under ``<segserve cache>/gguf-tokenizers/`` and
    later loads read that (~0.3 s): the same tokenizer.json, config and chat template."""
    if "tokenizer.ggml.model" not in open_gguf(path).fields:
        logger.warning("%s has no tokenizer metadata: only token-id prompts will work", path)
        return None
    from transformers import AutoTokenizer

    saved = _tokenizer_cache(path)
    if (saved / _DONE).is_file():
        try:
            return AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
        except Exception:  # a damaged cache entry: convert again, below
            logger.warning("cannot load the cached tokenizer %s; converting again", saved,
                           exc_info=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  local_files_only=True)
    except Exception as e:  # the converter raises many types; name the file either way
        raise ModelLoadError(f"cannot convert the tokenizer in {path}: {e}") from e
    _save_tokenizer(tokenizer, saved)
    return tokenizer


_DONE = ".complete"


def _tokenizer_cache(path: Path) -> Path:
    import hashlib

    import transformers

    from .fetch import default_cache_dir

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|1"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_dir() / "gguf-tokenizers" / f"{path.stem}-{digest}"


def _save_tokenizer(tokenizer: Any, saved: Path) -> None:
    """Written to a private directory, then renamed into place: racing processes each write
    their own copy and the first rename wins. A cache that cannot be written is no error."""
    import shutil
    import tempfile

    tmp = None
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{saved.name}.tmp-", dir=saved.parent))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _DONE).write_text("converted from GGUF\n")
        os.chmod(tmp, 0o755)
        os.rename(tmp, saved)
    except OSError as e:
        logger.debug("tokenizer cache %s not written: %s", saved, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def gguf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(HF name, float32 tensor, bytes read) for every tensor of the file, in file order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = open_gguf(path)
    arch = architecture(reader)
    heads = int(_field(reader, f"{arch}.attention.head_count", required=True))
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    kv_heads = int(kv_heads[0] if isinstance(kv_heads, list) else kv_heads)
    supported = {GGMLQuantizationType[t] for t in SUPPORTED_TYPES}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if t.tensor_type not in supported:
            raise ModelLoadError(
                f"GGUF tensor {t.name!r} has type {t.tensor_type.name}; segserve dequantizes "
                f"{', '.join(SUPPORTED_TYPES)}"
            )
        try:
            data = dequantize(t.data, t.tensor_type)
            # F32 comes back as a read-only view of the file's memmap: copy that one.
            w = torch.from_numpy(data if data.flags.writeable else data.copy())
        except (ValueError, IndexError) as e:
            raise ModelLoadError(f"GGUF tensor {t.name!r} cannot be dequantized: {e}") from e
        if arch in _PERMUTED_QK:
            if ".q_proj." in name:
                w = unpermute_qk(w, heads)
            elif ".k_proj." in name:
                w = unpermute_qk(w, kv_heads)
        yield name, w, int(t.n_bytes)
