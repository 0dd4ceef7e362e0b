"""ModelSpec: the few numbers our model code needs, read from a HF ``config.json``.

HF's config classes supply each family's defaults (Mistral's sliding window, Qwen2's layer types,
v5's ``rope_parameters``), so we parse through ``AutoConfig`` and keep only what we use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # One entry per layer: the window size, or None for full attention.
    sliding_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: Any = None  # kept for RoPE init, which needs the whole config

    def check_tensor_parallel(self, tp: int) -> None:
        """A ``tp`` that cannot split this model's heads or MLP fails here, before any rank
        starts (the vocabulary is padded instead)."""
        for what, n in (("attention heads", self.num_heads), ("KV heads", self.num_kv_heads),
                        ("intermediate_size", self.intermediate_size)):
            if n % tp:
                raise ValueError(f"tensor_parallel_size {tp} does not divide the model's "
                                 f"{what} ({n})")

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        archs = getattr(config, "architectures", None) or []
        family = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if family is None:
            family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(
                getattr(config, "model_type", ""), None
            )
        if family is None:
            raise ValueError(
                f"unsupported model architecture {archs or config.model_type!r}; "
                f"segserve supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if family == "mistral":
            windows = [window] * num_layers
        elif family == "qwen2":
            layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
            windows = [window if t == "sliding_attention" else None for t in layer_types]
        else:
            windows = [None] * num_layers
        eos = getattr(config, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            family=family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family == "llama" and attention_bias,
            mlp_bias=family == "llama" and bool(getattr(config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_windows=windows,
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_ids=eos_ids,
            hf_config=config,
        )

    @property
    def rope_type(self) -> str:
        return rope_parameters(self.hf_config).get("rope_type", "default")

    def rope_cos_sin(self, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin tables ``[max_positions, head_dim]``, computed exactly as HF does."""
        inv_freq, scaling = rope_inv_freq(self.hf_config, self.head_dim)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling


def rope_parameters(config: Any) -> dict:
    """RoPE settings in transformers v5 form, also from a v4-style config."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return scaling


def rope_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type == "longrope":
        # Changes frequencies with the running sequence length, which a shared prompt segment
        # cannot follow (its keys were rotated once).
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    # "dynamic" (NTK) equals its initial frequencies up to max_position_embeddings, which
    # EngineConfig.max_model_len may not exceed for it (checked in ModelRunner).
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)
