"""The Llama family (Llama 2/3, Mistral, Qwen2) written on segserve's kernel interface.

Differences between the families are data in ``ModelSpec``: biases, sliding windows, tied
embeddings, RoPE type. QKV and gate/up are fused into one GEMM each at load time.

Tensor parallelism (Megatron style): with ``tp_size > 1`` each rank holds its slice of heads
(column-parallel QKV), of the MLP (column-parallel gate/up) and of the vocabulary (the LM head),
and ``all_reduce`` sums the row-parallel o/down outputs in place, once each per layer. The
row-parallel biases live on rank 0 only, so the sum adds them once. The vocabulary is padded to
a multiple of ``tp_size``; padded columns' logits are -inf. With ``tp_size == 1``
``all_reduce`` is the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from segserve.kernels import AttentionMetadata, KernelBackend, LayerKV
from torch import nn

from .spec import ModelSpec

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Linear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, bias: bool, backend: KernelBackend
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.backend = backend

    def pack(self) -> None:
        """Swap the weight for the backend's packed layout, if it has one (after loading)."""
        packed = self.backend.pack_linear_weight(self.weight.data)
        if packed is not None:
            self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, backend: KernelBackend) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps
        self.backend = backend

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(normed, residual_out)``: the residual stream is carried beside x."""
        if residual is None:
            return self.backend.rms_norm(x, self.weight, self.eps), x
        return self.backend.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        layer: int,
        backend: KernelBackend,
        tp_size: int,
        all_reduce: AllReduce,
    ) -> None:
        super().__init__()
        if spec.num_heads % tp_size or spec.num_kv_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size {tp_size} must divide num_heads {spec.num_heads} "
                f"and num_kv_heads {spec.num_kv_heads}"
            )
        self.num_heads = spec.num_heads // tp_size
        self.num_kv_heads = spec.num_kv_heads // tp_size
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.sliding_window = spec.sliding_windows[layer]
        self.backend = backend
        self.all_reduce = all_reduce
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = Linear(spec.hidden_size, qkv_out, spec.qkv_bias, backend)
        self.o_proj = Linear(self.num_heads * self.head_dim, spec.hidden_size, spec.o_bias, backend)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: LayerKV,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kv = LayerKV(*kv_cache)
        q = self.backend.rope_write_kv(
            q, k, v, *cos_sin, kv.k, kv.v, meta.slot_mapping, kv.k_scale, kv.v_scale
        )
        out = self.backend.attention(
            q, kv.k, kv.v, meta, self.scale, self.sliding_window, kv.k_scale, kv.v_scale
        )
        return self.all_reduce(self.o_proj(out.flatten(1)))


class MLP(nn.Module):
    def __init__(
        self, spec: ModelSpec, backend: KernelBackend, tp_size: int, all_reduce: AllReduce
    ) -> None:
        super().__init__()
        if spec.intermediate_size % tp_size:
            raise ValueError(
                f"tensor_parallel_size {tp_size} must divide intermediate_size "
                f"{spec.intermediate_size}"
            )
        inter = spec.intermediate_size // tp_size
        self.gate_up_proj = Linear(spec.hidden_size, 2 * inter, spec.mlp_bias, backend)
        self.down_proj = Linear(inter, spec.hidden_size, spec.mlp_bias, backend)
        self.backend = backend
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(self.down_proj(self.backend.silu_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        layer: int,
        backend: KernelBackend,
        tp_size: int,
        all_reduce: AllReduce,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, backend)
        self.self_attn = Attention(spec, layer, backend, tp_size, all_reduce)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, backend)
        self.mlp = MLP(spec, backend, tp_size, all_reduce)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: LayerKV,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos_sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Parameter names follow HF's minus the ``model.`` prefix, with fused qkv/gate_up."""

    def __init__(
        self,
        spec: ModelSpec,
        backend: KernelBackend,
        tp_rank: int = 0,
        tp_size: int = 1,
        all_reduce: AllReduce | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backend = backend
        self.tp_rank, self.tp_size = tp_rank, tp_size
        all_reduce = all_reduce or _identity
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, backend, tp_size, all_reduce) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, backend)
        # Vocab-parallel LM head: each rank owns a slice of the (padded) vocabulary.
        self.vocab_per_rank = -(-spec.vocab_size // tp_size)
        self.vocab_start = tp_rank * self.vocab_per_rank
        self.vocab_real = max(0, min(self.vocab_per_rank, spec.vocab_size - self.vocab_start))
        self.lm_head = Linear(spec.hidden_size, self.vocab_per_rank, False, backend)
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        cos, sin = self.spec.rope_cos_sin(max_positions)
        self.cos_sin = (cos.to(device), sin.to(device))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[LayerKV],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm, for the packed new tokens."""
        assert self.cos_sin is not None, "call init_rope() after loading"
        cos_sin = (self.cos_sin[0][positions], self.cos_sin[1][positions])  # once per step
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos_sin, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def pack_weights(self) -> None:
        """Let the backend re-lay out every linear weight once, after loading."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits slice, in float32 (sampling and log-probs want the precision)."""
        logits = self.lm_head(hidden).float()
        if self.vocab_real < self.vocab_per_rank:  # vocabulary padding never wins
            logits[:, self.vocab_real :] = float("-inf")
        return logits
