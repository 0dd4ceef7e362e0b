"""Shared fixtures: tiny random HF checkpoints of every supported family, made offline.

Each model is built with transformers' own config/model classes and ``save_pretrained``, so our
loader reads exactly what a user's checkpoint looks like, and HF's ``generate`` is the oracle.
"""

from __future__ import annotations

import functools
import os

import pytest

# First, before transformers: importing segserve moves the checkout's root to the end of
# sys.path, where its folders (kernels, models...) no longer shadow installed packages.
import segserve  # noqa: F401
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

VOCAB = 256


def _tokenizer():
    from segserve.models.demo import build_tokenizer

    return build_tokenizer(VOCAB)


def _config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "llama3":
        common.setdefault(
            "rope_scaling",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        common.setdefault("rope_theta", 500000.0)
        return LlamaConfig(**common)
    if family == "mistral":
        common.setdefault("sliding_window", 24)  # small, so tests cross the window
        common.setdefault("head_dim", 32)  # head_dim != hidden / heads
        return MistralConfig(**common)
    if family == "qwen2":
        common.setdefault("tie_word_embeddings", True)
        return Qwen2Config(**common)
    raise ValueError(family)


def make_model(
    path, family: str, seed: int = 0, dtype=torch.float32, sharpen: bool = True, **overrides
):
    """Save a tiny random model of ``family`` (with a tokenizer) to ``path``; return HF model."""
    from transformers import AutoModelForCausalLM

    config = _config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    # Random init at std 0.02 gives near-flat logits; sharpen them so greedy choices are decided
    # by real margins, not by float rounding (both sides still compute in float32).
    with torch.no_grad():
        for name, p in model.named_parameters() if sharpen else ():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer().save_pretrained(path)
    return model


FAMILIES = ["llama", "llama3", "mistral", "qwen2"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (path, hf_model)} for every supported family."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        out[family] = (str(path), make_model(path, family))
    return out


def hf_generate(model, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """HF ``generate`` (no sampling) on one unpadded prompt, on the model's device: the new
    tokens of each returned sequence, cut after EOS (HF pads finished beams behind it)."""
    with torch.no_grad():
        ids = torch.tensor([prompt_ids], device=model.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
    eos = model.generation_config.eos_token_id
    rows = out[:, len(prompt_ids) :].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return hf_generate(model, prompt_ids, max_new_tokens, num_beams=1)[0]


def hf_beams(
    model, prompt_ids: list[int], max_new_tokens: int, width: int, **kwargs
) -> list[list[int]]:
    return hf_generate(
        model, prompt_ids, max_new_tokens, num_beams=width, num_return_sequences=width, **kwargs
    )


def hf_greedy_no_eos(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy by plain forward passes, straight through EOS (the oracle for ignore_eos)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@functools.cache
def smollm2_or_reason():
    """(the real SmolLM2-135M-Instruct GGUF, None), fetched into the segserve cache if need be
    (.ci/run fetches it first), or (None, why it cannot be had). Tried once per session."""
    from segserve.models.fetch import FetchError, fetch_model

    try:
        return fetch_model("smollm2"), None
    except FetchError as e:
        return None, f"SmolLM2-135M-Instruct is not available: {e}"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2 GGUF; tests that need it skip, saying why, where it cannot be had."""
    path, reason = smollm2_or_reason()
    if path is None:
        pytest.skip(reason)
    return path
