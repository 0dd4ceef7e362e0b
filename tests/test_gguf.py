"""GGUF checkpoints (models/gguf.py): tiny HF models written with the ``gguf`` package's own
writer, then loaded by our loader and by HF's GGUF loader (``from_pretrained(gguf_file=)``).

Oracles: the original HF weights (within each quant type's rounding), HF's GGUF loader (same
weights, and greedy output), and, for the K-quants the writer cannot make, the package's own
``gguf.quants.dequantize`` of random blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hf_greedy, make_model

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from segserve import LLM, SamplingParams  # noqa: E402
from segserve.models import ModelLoadError, load_spec, load_tokenizer  # noqa: E402
from segserve.models.gguf import is_gguf  # noqa: E402

PROMPTS = [[0, 5, 17, 42, 99, 3], [0, 200, 7], [0, 64, 65, 66, 67, 68, 69, 70, 71, 150]]
# A weight's largest dequantization error, as a fraction of its tensor's largest magnitude
# (twice the worst half-step of each format, so rounding never fails a test).
TOLERANCE = {Q.F32: 0.0, Q.F16: 2**-10, Q.BF16: 2**-7, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8,
             Q.Q4_1: 1 / 15}
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "lm_head.weight": "output.weight"}
LAYER_PARTS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_PARTS[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tokenizer_metadata(writer, path: Path) -> None:
    """The demo BPE (saved beside the model by make_model) as GGUF 'gpt2' tokenizer metadata."""
    data = json.loads((path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    special = {t["id"] for t in data["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    if merges:
        writer.add_token_merges(merges)
    else:  # a vocabulary of single bytes: HF then derives (no) merges from the scores
        writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                             "{{ eos_token }}{% endfor %}")


def write_gguf(out: Path, hf_model, src: Path, qtype: Q, arch: str = "llama",
               random_blocks: np.random.Generator | None = None,
               sliding_window: int | None = None) -> dict[str, np.ndarray]:
    """Write ``hf_model`` as a GGUF file of ``arch`` with its matrices in ``qtype``; 1-D tensors
    stay F32, as llama.cpp keeps them. With ``random_blocks`` the matrices are random bytes
    instead (K-quants). Returns the raw matrix bytes written, by GGUF name."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if sliding_window is not None:
        w.add_sliding_window(sliding_window)
    tokenizer_metadata(w, src)
    written = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = t.detach().float().numpy()
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if data.ndim == 1:
            w.add_tensor(gguf_name(name), data.astype(np.float32))
            continue
        if random_blocks is not None:
            raw = random_kquant_bytes(random_blocks, data.shape, qtype)
        else:
            raw = gguf.quants.quantize(data, qtype)
        written[gguf_name(name)] = raw
        w.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def random_kquant_bytes(rng: np.random.Generator, shape: tuple[int, int], qtype: Q) -> np.ndarray:
    """Random K-quant blocks whose f16 super-block scales are small and finite (random bytes
    there would make infinities and NaNs)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(2e-4, 2e-3, size=(rows, cols // block, 2)).astype(np.float16)
    if qtype == Q.Q6_K:  # ql, qh, int8 scales, then d
        raw[..., size - 2:] = scales[..., :1].view(np.uint8)
    else:  # d and dmin first
        raw[..., :4] = scales.view(np.uint8).reshape(rows, cols // block, 4)
    return raw.reshape(rows, cols // block * size)


def hf_from_gguf(file: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(file.parent), gguf_file=file.name, dtype=torch.float32).eval()


def our_weights(llm: LLM) -> dict[str, torch.Tensor]:
    """Our fused parameters split back into HF names."""
    model = llm.engine.runner.model
    spec = model.spec
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    out = {"model.embed_tokens.weight": model.embed_tokens.weight,
           "model.norm.weight": model.norm.weight, "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv = layer.self_attn.qkv_proj
        for kind in ("weight", "bias"):
            t = getattr(qkv, kind)
            if t is not None:
                (out[p + f"self_attn.q_proj.{kind}"], out[p + f"self_attn.k_proj.{kind}"],
                 out[p + f"self_attn.v_proj.{kind}"]) = t.split([q, kv, kv])
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        out.update({p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
                    p + "input_layernorm.weight": layer.input_layernorm.weight,
                    p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight})
    return out


def load_ours(file: Path) -> LLM:
    return LLM(str(file), device="cpu", dtype="float32", num_kv_blocks=64)


def check_greedy(llm: LLM, hf) -> None:
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12), prompt


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Converted tokenizers are cached in the segserve cache: keep this module's out of yours."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("segserve-cache")))
        yield


# ----- round trips -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, make_model(path, "llama")


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_round_trip(tmp_path, tiny_llama, qtype):
    src, hf_orig = tiny_llama
    file = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(file, hf_orig, src, qtype)
    llm, hf = load_ours(file), hf_from_gguf(file)
    ours, theirs, orig = our_weights(llm), hf.state_dict(), hf_orig.state_dict()
    assert set(ours) == set(orig)
    for name, t in ours.items():
        # HF's GGUF loader dequantizes the same bytes: the same float32 values.
        torch.testing.assert_close(t, theirs[name], rtol=0, atol=0, msg=name)
        # The original weights, within the format's rounding (checks the Q/K un-permutation
        # against the writer's permutation, independently of HF).
        atol = TOLERANCE[qtype] * orig[name].abs().max().item() if t.dim() == 2 else 0.0
        torch.testing.assert_close(t, orig[name], rtol=0, atol=atol, msg=name)
    check_greedy(llm, hf)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quants_match_gguf_dequantize(tmp_path_factory, tmp_path, qtype):
    # K-quant super-blocks are 256 wide: every matrix's rows must be a multiple of that.
    src = tmp_path_factory.mktemp(f"kq-{qtype.name}")
    hf_orig = make_model(src, "llama", hidden_size=256, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=2)
    file = tmp_path / f"tiny-{qtype.name}.gguf"
    raw = write_gguf(file, hf_orig, src, qtype, random_blocks=np.random.default_rng(0))
    llm, hf = load_ours(file), hf_from_gguf(file)
    ours, theirs = our_weights(llm), hf.state_dict()
    cfg = hf_orig.config
    for name, t in ours.items():
        if t.dim() != 2:
            continue
        oracle = torch.from_numpy(gguf.quants.dequantize(raw[gguf_name(name)], qtype))
        stored = t.numpy()  # ours, permuted back the way llama.cpp stores Q/K
        if ".q_proj." in name:
            stored = llama_cpp_permute(stored, cfg.num_attention_heads)
        elif ".k_proj." in name:
            stored = llama_cpp_permute(stored, cfg.num_key_value_heads)
        torch.testing.assert_close(torch.from_numpy(stored), oracle, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(t, theirs[name], rtol=0, atol=0, msg=name)
    check_greedy(llm, hf)


def test_qwen2_round_trip(tmp_path_factory, tmp_path):
    """qwen2: Q/K stored unpermuted (NEOX RoPE), q/k/v biases, tied embeddings."""
    src = tmp_path_factory.mktemp("tiny-qwen2")
    hf_orig = make_model(src, "qwen2")
    file = tmp_path / "qwen2.gguf"
    write_gguf(file, hf_orig, src, Q.F32, arch="qwen2")
    spec = load_spec(file)
    assert (spec.family, spec.qkv_bias, spec.tie_word_embeddings) == ("qwen2", True, True)
    llm, hf = load_ours(file), hf_from_gguf(file)
    ours, orig = our_weights(llm), hf_orig.state_dict()
    for name, t in ours.items():
        torch.testing.assert_close(t, orig[name], rtol=0, atol=0, msg=name)
    check_greedy(llm, hf)


def test_mistral_sliding_window_from_metadata(tmp_path_factory, tmp_path):
    src = tmp_path_factory.mktemp("tiny-mistral")
    hf_orig = make_model(src, "mistral")  # head dim 32 != hidden / heads: key_length says so
    file = tmp_path / "mistral.gguf"
    write_gguf(file, hf_orig, src, Q.F32, arch="mistral", sliding_window=24)
    spec = load_spec(file)
    assert (spec.family, spec.sliding_windows, spec.head_dim) == ("mistral", [24, 24], 32)
    ours, orig = our_weights(load_ours(file)), hf_orig.state_dict()
    for name, t in ours.items():  # "mistral" files are read unpermuted, as HF reads them
        torch.testing.assert_close(t, orig[name], rtol=0, atol=0, msg=name)


def test_spec_and_tokenizer_from_metadata(tmp_path, tiny_llama):
    from transformers import AutoConfig, AutoTokenizer

    src, hf_orig = tiny_llama
    file = tmp_path / "tiny.gguf"
    write_gguf(file, hf_orig, src, Q.F16)
    spec = load_spec(file)
    theirs = AutoConfig.from_pretrained(str(tmp_path), gguf_file=file.name)
    assert spec.family == "llama"
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, spec.vocab_size) == (
        theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads,
        theirs.num_key_value_heads, theirs.head_dim, theirs.vocab_size)
    assert spec.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    assert spec.tie_word_embeddings is False and spec.eos_token_ids == [1]
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=file.name)
    text = "The weather today: 18 degrees, light rain!"
    chat = [{"role": "user", "content": "Hello"}]
    # Converted on first use, then read back from the segserve cache: the same either way.
    for tok in (load_tokenizer(file), load_tokenizer(file)):
        assert tok.encode(text) == hf_tok.encode(text)
        assert tok.apply_chat_template(chat, tokenize=False) == "<|user|>\nHello</s>"
        assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")


def test_model_argument_forms(tmp_path, tiny_llama):
    from segserve.models import resolve_model_path

    src, hf_orig = tiny_llama
    file = tmp_path / "only.gguf"
    write_gguf(file, hf_orig, src, Q.F32)
    assert is_gguf(file) and resolve_model_path(str(file)) == file
    # A directory without config.json that holds one GGUF file means that file.
    assert resolve_model_path(str(tmp_path)) == file
    (tmp_path / "second.gguf").write_bytes(file.read_bytes())
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        resolve_model_path(str(tmp_path))


# ----- bad files -------------------------------------------------------------------------------
def test_truncated_file_names_the_tensor(tmp_path, tiny_llama):
    src, hf_orig = tiny_llama
    file = tmp_path / "cut.gguf"
    write_gguf(file, hf_orig, src, Q.Q8_0)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"GGUF tensor '[^']+' ends at byte \d+ .*truncated"):
        load_spec(file)


def test_truncated_header_is_a_clear_error(tmp_path, tiny_llama):
    src, hf_orig = tiny_llama
    file = tmp_path / "head.gguf"
    write_gguf(file, hf_orig, src, Q.F32)
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_spec(file)


def test_not_a_gguf_file(tmp_path):
    file = tmp_path / "junk.gguf"
    file.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelLoadError, match="junk.gguf is not a readable GGUF file"):
        load_spec(file)


def test_unknown_architecture(tmp_path, tiny_llama):
    src, hf_orig = tiny_llama
    file = tmp_path / "gpt2.gguf"
    write_gguf(file, hf_orig, src, Q.F32, arch="gpt2")
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF architecture 'gpt2' "
                                             r"\(general.architecture\)"):
        LLM(str(file), num_kv_blocks=16)


def test_unsupported_tensor_type_names_it(tmp_path, tiny_llama):
    src, hf_orig = tiny_llama
    file = tmp_path / "q5.gguf"
    write_gguf(file, hf_orig, src, Q.Q5_0)
    with pytest.raises(ModelLoadError, match=r"GGUF tensor 'token_embd.weight' has type Q5_0"):
        load_ours(file)
