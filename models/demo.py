"""A tiny, randomly initialised Llama checkpoint built locally, for demos and tests.

Nothing here touches the network: the tokenizer is trained on an embedded corpus and the weights
come from a fixed seed, so every machine builds the same checkpoint. Its output is gibberish.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:  # transformers' model classes cost seconds to import: only when building
    from transformers import LlamaConfig, PreTrainedTokenizerFast

DEMO_MODEL_NAME = "demo"
# Bump the suffix whenever anything below changes what gets built, so stale caches are not reused.
_DIR_NAME = "demo-llama-v1"
_MARKER = ".complete"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Zephyr-like markers in plain text: the BPE encodes them as ordinary tokens. The template adds
# `<s>` itself because apply_chat_template tokenizes with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
To make a simple tomato soup, warm two tablespoons of olive oil in a large pot over medium heat.
Add one chopped onion and three cloves of garlic, and cook them for about 5 minutes, until soft.
Pour in 800 grams of crushed tomatoes and 500 ml of vegetable stock; season with salt, pepper
and a pinch of sugar. Let it simmer for 20 minutes, then blend until smooth. Serve it hot with
fresh bread, a spoon of cream, and a few leaves of basil. Leftovers keep for 3 days in the fridge.

The weather today will be cloudy in the morning, with light rain moving in from the west by noon.
Temperatures should reach 18 degrees in the afternoon before falling to 9 degrees overnight.
Winds from the north-west at 15 to 25 km/h will make it feel cooler near the coast. Tomorrow
looks brighter: sunny spells, a high of 21 degrees, and only a 10% chance of showers. Later in
the week, a warm front may bring thunderstorms, so keep an umbrella close!

A computer runs programs by reading instructions from memory and executing them, one after
another, billions of times per second. The processor has a few cores, each with its own cache;
data that is used often stays in the cache, because reading from main memory is much slower.
Programs are written in languages such as Python, C or Rust, then compiled or interpreted. When
a program needs more memory than the machine has, the operating system may swap pages to disk,
and everything slows down. Good software measures first, and optimises the parts that matter.

Questions? Answers! Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024 and 3.14
appear everywhere: in recipes (1/2 cup), forecasts (-3 C), and code (x = y + 1; if (a > b) {}).
Punctuation matters too: commas, periods, colons: semicolons; "quotes", 'apostrophes', [brackets],
<angles>, #hashes, @signs, $dollars, %percent, ^carets, &ampersands, *stars, ~tildes and |pipes|.
The user asked a question, and the assistant gave a short, helpful answer. Thank you very much.
"""


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the demo byte-level BPE on the embedded corpus and wrap it for transformers."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: "hi" and " hi" encode differently, as in GPT-2/Llama-3 style BPEs.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],  # listed first, so they get ids 0, 1, 2
        # All 256 byte symbols, even ones the corpus lacks, so any string encodes without unk.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def demo_config(vocab_size: int) -> LlamaConfig:
    """The demo model's architecture: about 3.2M parameters (12.7 MB in float32)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )


def _is_complete(path: Path) -> bool:
    return (path / _MARKER).is_file()


def _build(out: Path) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = demo_config(len(tokenizer))
    # fork_rng keeps the caller's RNG state untouched; building on the CPU in float32 (whatever
    # the caller's default device/dtype) keeps the weights identical on every machine.
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.set_default_dtype(torch.float32)
        try:
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # mkdtemp makes the dir 0700 and the safetensors writer leaves 0600; the cache may be shared
    # between users (e.g. Ray workers), and it holds nothing secret.
    os.chmod(out, 0o755)
    for f in out.iterdir():
        os.chmod(f, 0o644)
    (out / _MARKER).write_text(f"{DEMO_MODEL_NAME}\n")  # written last: the dir is usable now


def ensure_demo_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the demo checkpoint directory `<cache_dir>/demo-llama-v1`, building it if needed.

    `cache_dir` defaults to `$SEGSERVE_CACHE_DIR`, else `~/.cache/segserve`. Safe to call from
    several processes at once: each builds privately and the first atomic rename wins.
    """
    from .fetch import default_cache_dir

    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = parent / _DIR_NAME
    if _is_complete(target):
        return target
    parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target, so the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DIR_NAME}.tmp-", dir=parent))
    try:
        _build(tmp)
        for _ in range(3):
            try:
                os.rename(tmp, target)  # fails if target exists and is non-empty
                return target
            except OSError:
                if _is_complete(target):
                    return target  # another process won the race; ours is discarded below
                if target.exists():
                    # Incomplete leftovers (never made by us: our renames are atomic). Move them
                    # aside atomically before deleting, so a racing builder sees no half state.
                    junk = Path(tempfile.mkdtemp(prefix=f".{_DIR_NAME}.junk-", dir=parent))
                    try:
                        os.rename(target, junk / "old")
                    except OSError:
                        pass  # someone else moved it first, or replaced it: just retry
                    shutil.rmtree(junk, ignore_errors=True)
        raise RuntimeError(f"could not install the demo model at {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
