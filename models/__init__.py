"""Llama-family models on the kernel interface, the HF checkpoint loader, the demo model."""

from .llama import LlamaForCausalLM
from .loader import (
    DTYPES,
    ModelLoadError,
    load_model,
    load_spec,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from .spec import ModelSpec

__all__ = [
    "DTYPES",
    "LlamaForCausalLM",
    "ModelLoadError",
    "ModelSpec",
    "load_model",
    "load_spec",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model_path",
]
