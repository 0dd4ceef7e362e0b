#!/usr/bin/env python
"""Offline benchmark: segserve against HF transformers (eager) and the memory-bandwidth floor,
side by side, in one run, on one device.

    python bench/offline.py --model demo --device cpu
    python bench/offline.py --model smollm2 --device cpu        # a GGUF: HF loads the same file
    python bench/offline.py --random-shape tinyllama-1.1b --dtype bfloat16 --device cpu
    python bench/offline.py --random-shape llama2-7b --dtype bfloat16 --device cuda

What is measured:

* **batch-1 decode latency.** Ours: the median time of an ``EngineCore.step()`` that only
  decodes (prefill excluded). HF: ``generate`` (greedy) timed at two ``max_new_tokens`` values;
  the difference over the extra tokens is the per-token decode time, free of prefill and
  set-up costs.
* **floor.** A decode step must read every weight once: weight bytes / measured memory
  bandwidth. The bandwidth comes from a large tensor sum (read) and copy (read + write) on the
  same device; the higher of the two is used, so the floor is never flattered.
* **throughput** at a few batch sizes: ``batch x output_len`` generated tokens over the wall
  time of the whole batch, prefill included, for both (HF: one ``generate`` call on a batch of
  equal-length prompts, so no padding).

The demo model (12.7 MB) fits in the CPU's caches, so its floor is an L2/L3 floor, not a DRAM
one, and its step time is all framework overhead; use ``--random-shape`` for the shapes the
design's targets are stated on.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from segserve.actors import EngineConfig, EngineCore
from segserve.deploy.cli import (
    BatchTiming,
    format_table,
    kv_blocks_needed,
    measure_batch,
    random_prompts,
    set_cpu_threads,
    threads_arg,
)
from segserve.models import resolve_dtype

# Architectures of the design's benchmark targets (design.md), built with random weights.
SHAPES: dict[str, dict[str, int]] = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096),
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo",
                   help="HF checkpoint directory, .gguf file, 'smollm2' or 'demo'")
    p.add_argument("--random-shape", choices=sorted(SHAPES), default=None,
                   help="benchmark a random-weight Llama of this shape instead of --model "
                        "(built once into $SEGSERVE_CACHE_DIR)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=3, help="HF timings: median of this many")
    p.add_argument("--threads", type=threads_arg, default="auto", metavar="N|auto",
                   help="CPU: torch threads; auto (default) probes for the fastest count, "
                        "which both engines then use")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the bandwidth probe tensor (default: 512 CPU, 4096 GPU)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kernel-backend", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="ours and the floor only")
    args = p.parse_args(argv)
    if args.output_len < 4:
        p.error("--output-len must be >= 4 (HF's per-token time needs two lengths)")
    if args.input_len < 1 or args.repeats < 1:
        p.error("--input-len and --repeats must be >= 1")
    return args


# ----- timing helpers --------------------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "xpu":
        return lambda: torch.xpu.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def measure_bandwidth(device: torch.device, mib: int, repeats: int = 5) -> tuple[float, float]:
    """(read GB/s from a sum, copy GB/s counting read + write), best of ``repeats``. The tensor
    is far larger than any cache, so this is DRAM/HBM bandwidth."""
    sync = synchronizer(device)
    n = mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)  # touched, so no first-touch faults
    y = torch.empty_like(x)
    y.copy_(x)
    nbytes = x.numel() * x.element_size()
    read = min(timed(lambda: x.sum(), sync) for _ in range(repeats))
    copy = min(timed(lambda: y.copy_(x), sync) for _ in range(repeats))
    return nbytes / read / 1e9, 2 * nbytes / copy / 1e9


def weight_bytes_per_step(core: EngineCore) -> int:
    """Bytes a decode step must read: every parameter except the embedding table, of which a step
    reads one row per token (the LM head is its own matrix in our model, tied or not)."""
    return sum(p.numel() * p.element_size() for name, p in core.runner.model.named_parameters()
               if not name.startswith("embed_tokens"))


# ----- the model under test --------------------------------------------------------------------
def build_random_checkpoint(shape: str, dtype: str, device: torch.device) -> Path:
    """A random-weight Llama of ``shape`` saved as an HF checkpoint (no tokenizer: the benchmark
    feeds token ids). Cached by shape and dtype; built on ``device`` for speed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cache = Path(os.environ.get("SEGSERVE_CACHE_DIR") or Path.home() / ".cache" / "segserve")
    path = cache / f"bench-random-{shape}-{dtype}"
    if (path / ".complete").is_file():
        return path
    print(f"building a random {shape} checkpoint in {path} ...", flush=True)
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    torch_dtype = resolve_dtype(dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(path, safe_serialization=True)
    (path / ".complete").write_text(shape)
    del model
    gc.collect()
    return path


def run_ours(core: EngineCore, prompts: dict[int, list[list[int]]], warm: dict[int, list],
             output_len: int) -> dict[int, BatchTiming]:
    out = {}
    for b, batch in prompts.items():
        measure_batch(core, warm[b], min(output_len, 8))  # warm-up at this shape
        out[b] = measure_batch(core, batch, output_len)
    return out


def run_hf(path: Path, device: torch.device, dtype: torch.dtype,
           prompts: dict[int, list[list[int]]], output_len: int,
           repeats: int) -> tuple[float, dict[int, float], str]:
    """(per-token decode seconds at batch 1, {batch: tok/s}, attention implementation)."""
    from segserve.models.gguf import is_gguf
    from transformers import AutoModelForCausalLM

    # A GGUF: HF dequantizes the same file (to dtype), so both run the same weights.
    where, extra = (path.parent, {"gguf_file": path.name}) if is_gguf(path) else (path, {})
    model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, **extra)
    model = model.to(device).eval()
    sync = synchronizer(device)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0

    def generate(batch: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(batch, device=device)

        def call() -> None:
            # min_new_tokens keeps EOS from ending a row early: every row makes new_tokens.
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=pad)
        return timed(call, sync)

    one = prompts[min(prompts)][:1]
    short, long = max(2, output_len // 4), output_len
    generate(one, short)  # warm-up
    t_short = statistics.median(generate(one, short) for _ in range(repeats))
    t_long = statistics.median(generate(one, long) for _ in range(repeats))
    per_token = (t_long - t_short) / (long - short)
    tput = {}
    for b, batch in prompts.items():
        generate(batch, 2)  # warm-up at this batch size
        t = statistics.median(generate(batch, output_len) for _ in range(repeats))
        tput[b] = b * output_len / t
    attn = getattr(model.config, "_attn_implementation", "?")
    return per_token, tput, attn  # the model is freed with this frame


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and a == a and b == b else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only, never the network
    device = torch.device(args.device)
    model = (str(build_random_checkpoint(args.random_shape, args.dtype, device))
             if args.random_shape else args.model)

    max_b = max(args.batch_sizes)
    config = EngineConfig(
        model=model, device=args.device, dtype=args.dtype, block_size=args.block_size,
        kernel_backend=args.kernel_backend, max_num_seqs=max_b, seed=args.seed,
        # Sized to the workload, so a GPU run leaves memory for the HF model loaded after ours.
        num_kv_blocks=kv_blocks_needed(max_b, args.input_len, args.output_len, args.block_size),
        max_num_batched_tokens=max(2048, max_b * args.input_len),
    )
    core = EngineCore(config)
    if args.input_len + args.output_len > core.max_model_len:
        raise SystemExit(f"input-len + output-len exceeds the model's max length "
                         f"{core.max_model_len}")

    import random

    rng = random.Random(args.seed)
    vocab = core.spec.vocab_size
    sizes = sorted(set(args.batch_sizes) | {1})  # batch 1 always: it gives the latency
    prompts = {b: random_prompts(rng, vocab, b, args.input_len) for b in sizes}
    warm = {b: random_prompts(rng, vocab, b, args.input_len) for b in sizes}

    nparams = sum(p.numel() for p in core.runner.model.parameters())
    threads = ", " + set_cpu_threads(args.threads) if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    load = f", load avg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"model {Path(model).name} ({nparams / 1e6:.1f}M params), {name} {args.dtype}{threads}"
          f"{load}; input {args.input_len}, output {args.output_len} tokens, greedy", flush=True)

    mib = args.bandwidth_mib or (512 if device.type == "cpu" else 4096)
    read_bw, copy_bw = measure_bandwidth(device, mib)
    bw = max(read_bw, copy_bw)
    wbytes = weight_bytes_per_step(core)
    floor = wbytes / (bw * 1e9)
    print(f"memory bandwidth ({mib} MiB probe): read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s "
          f"(read+write) -> {bw:.1f} GB/s", flush=True)
    print(f"weights read per decode step: {wbytes / 1e6:.1f} MB -> floor {floor * 1e3:.3f} ms",
          flush=True)

    ours = run_ours(core, prompts, warm, args.output_len)
    print("\nsegserve engine alone:")
    print(format_table([ours[b] for b in sizes]), flush=True)
    ours_step = ours[1].decode_p50_s
    model_dir = core.model_path
    # Free our engine before HF loads: on a GPU both 7B copies plus HF's cache may not fit.
    del core
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    hf_step, hf_tput, attn = float("nan"), {}, "-"
    if not args.skip_hf:
        hf_step, hf_tput, attn = run_hf(model_dir, device, resolve_dtype(args.dtype), prompts,
                                        args.output_len, args.repeats)

    print(f"\nbatch-1 decode step (ms); HF eager attention: {attn}")
    print(f"{'floor':>9} {'ours':>9} {'HF':>9} {'ours/floor':>11} {'HF/ours':>9}")
    print(f"{floor * 1e3:>9.3f} {ours_step * 1e3:>9.3f} {hf_step * 1e3:>9.3f} "
          f"{ratio(ours_step, floor):>11} {ratio(hf_step, ours_step):>9}")
    print(f"\nthroughput (generated tok/s, prefill included), input {args.input_len}, "
          f"output {args.output_len}")
    print(f"{'batch':>6} {'ours':>10} {'HF':>10} {'ours/HF':>9}")
    for b in sizes:
        hf = hf_tput.get(b, float("nan"))
        print(f"{b:>6} {ours[b].tokens_per_s:>10.1f} {hf:>10.1f} "
              f"{ratio(ours[b].tokens_per_s, hf):>9}")
    if hf_tput:
        best_b = max(hf_tput, key=hf_tput.__getitem__)
        best_ours = max(r.tokens_per_s for r in ours.values())
        print(f"best ours / best HF (HF at batch {best_b}): "
              f"{ratio(best_ours, hf_tput[best_b])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
