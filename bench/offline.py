#!/usr/bin/env python
"""Offline benchmark: the segserve engine against HF transformers and the hardware floors, side
by side, in one run, on one device.

    python bench/offline.py --model demo --device cpu
    python bench/offline.py --model smollm2 --device cpu        # a GGUF: HF loads the same file
    python bench/offline.py --random-shape tinyllama-1.1b --dtype bfloat16 --device cpu
    python bench/offline.py --random-shape llama2-7b --dtype bfloat16 --device cuda [--profile]

What it prints, in order:

* **ceilings**: read bandwidth (a large sum) and copy bandwidth (a large device copy, read +
  write counted), each the median of samples taken before and after our decode steps (the step
  is a median too), the bf16/fp16 matmul rate (a large square product), the weight bytes a
  decode step must read, and so the floor of a decode step (weights + the step's KV reads, over
  the bandwidth).
* **our decode step** at each batch size: the median ``EngineCore.step()`` of steps that only
  decode (host work included), its ratio to the floor and the bandwidth it achieves.
* **HF transformers**: eager ``generate`` and, on CUDA, static cache + ``torch.compile`` where it
  runs: the per-token time at batch 1 (the difference of two generation lengths, free of prefill)
  and throughput at the HF batch sizes.
* **throughput** at input/output lengths (default 128/128 on GPU): ours at our best batch against
  HF eager at its best batch.
* **prefill**: one ``--prefill-len`` prompt (default 2,048 on GPU) against the matmul floor
  ``2 * params * tokens / matmul rate``.
* **beam search**: a ``--beam-width`` request's KV bytes (the prompt stored once) and step time,
  against our greedy batch of the same width and HF's beam search.
* ``--profile``: a torch.profiler table of one decode step (kernels, GPU busy time, idle time).
* ``--tp N``: only the replica group's decode step against TP=1, per batch size, next to the
  ideal 1/N (bench/tp_scaling.py); on CPU also gloo's against oneCCL's all-reduce latency.
* ``--prefix-keys``: only the cost of the prefix cache's block keys (sha256 chain) per block,
  against the 64-bit ``hash()`` it replaced, and a whole prompt's admission-time hit check.

On the CPU it adds (bench/cpu_kernels.py): SlimAttention prefill of ``--attn-len`` tokens
(default 1,024) as the engine runs it, in torch ops, against torch SDPA and the reference loop,
one layer's shapes; KV bytes per token, the model's dtype against int8; with ``--linear``, each
linear shape at 1 and 16 rows on plain weights, pre-packed oneDNN weights and cpu_native's bf16
kernel; with ``--elementwise``, Inductor-compiled element-wise chains against eager. Load
average is printed at the start and the end: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cpu_kernels  # bench/cpu_kernels.py, beside this script
import torch
import tp_scaling  # bench/tp_scaling.py
from segserve.actors import EngineConfig, EngineCore, SamplingParams
from segserve.actors.benchmark import (
    BatchTiming,
    format_table,
    kv_blocks_needed,
    measure_batch,
    random_prompts,
    set_cpu_threads,
)
from segserve.actors.kv_manager import SegmentKVManager, block_key, root_key
from segserve.actors.sequence import SequenceGroup
from segserve.kernels import cpu_native
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
    if min(values, default=0) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return [v for v in values if v > 0]


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
    p.add_argument("--input-len", type=int, default=None, help="default: 128 GPU, 32 CPU")
    p.add_argument("--output-len", type=int, default=None, help="default: 128 GPU, 32 CPU")
    p.add_argument("--batch-sizes", type=_int_list, default=None,
                   help="ours; default 1,8,32,64,128,256 on GPU, 1,8,16 on CPU")
    p.add_argument("--hf-batch-sizes", type=_int_list, default=None,
                   help="HF eager; default 1,16,64 on GPU, 1,8,16 on CPU")
    p.add_argument("--hf-compile-batch-sizes", type=_int_list, default=None,
                   help="HF static cache + torch.compile (CUDA only); default 1,16; '0' skips")
    p.add_argument("--prefill-len", type=int, default=None, help="default 2048 GPU, 0 CPU (skip)")
    p.add_argument("--beam-width", type=int, default=None, help="default 4 GPU, 0 CPU (skip)")
    p.add_argument("--repeats", type=int, default=3, help="HF timings: median of this many")
    p.add_argument("--threads", default="auto", metavar="N|auto",
                   help="CPU: torch threads; auto (default) probes for the fastest count, "
                        "which both engines then use")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the bandwidth probe tensor (default: 512 CPU, 4096 GPU)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-dtype", choices=("auto", "int8"), default="auto", help="our KV cache")
    p.add_argument("--attn-len", type=int, default=None,
                   help="CPU: SlimAttention vs SDPA prefill length (default 1024; 0 skips)")
    p.add_argument("--linear", action="store_true",
                   help="CPU: time each linear shape: plain, oneDNN-packed, cpu_native kernel")
    p.add_argument("--elementwise", action="store_true",
                   help="CPU: time Inductor-compiled element-wise chains vs eager (compiles)")
    p.add_argument("--kernel-backend", default=None)
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="ours and the floors only")
    p.add_argument("--profile", action="store_true",
                   help="profile one decode step at batch 1 and the largest batch")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="also time the decode step as a replica group of N ranks against one "
                        "(bench/tp_scaling.py); N GPUs on CUDA")
    p.add_argument("--communicator", default=None, help="with --tp: nccl, xccl, oneccl, gloo")
    p.add_argument("--prefix-keys", action="store_true",
                   help="only microbenchmark the prefix-cache block keys, then exit")
    args = p.parse_args(argv)
    gpu = args.device != "cpu"
    defaults = dict(input_len=128 if gpu else 32, output_len=128 if gpu else 32,
                    batch_sizes=[1, 8, 32, 64, 128, 256] if gpu else [1, 8, 16],
                    hf_batch_sizes=[1, 16, 64] if gpu else [1, 8, 16],
                    attn_len=0 if gpu else 1024,
                    hf_compile_batch_sizes=[1, 16] if args.device.startswith("cuda") else [],
                    prefill_len=2048 if gpu else 0, beam_width=4 if gpu else 0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_len < 4:
        p.error("--output-len must be >= 4 (HF's per-token time needs two lengths)")
    if args.input_len < 1 or args.repeats < 1 or not args.batch_sizes:
        p.error("--input-len, --repeats and --batch-sizes must be >= 1")
    return args


# ----- timing helpers --------------------------------------------------------------------------
def measure_prefix_keys(block_size: int, prompt_len: int = 2048, repeats: int = 2000) -> str:
    """Per-block cost of the sha256 block key against Python's hash() of the token tuple it
    replaced, and a whole prompt's keys + verified hit check as admission does it."""
    rng = random.Random(0)
    block = [rng.randrange(32000) for _ in range(block_size)]
    parent = root_key("bench")

    def per_call(fn: Callable[[], object], n: int) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t) / n)
        return best

    sha = per_call(lambda: block_key(parent, block), repeats)
    old = per_call(lambda: hash((0, tuple(block))), repeats)
    prompt = [rng.randrange(32000) for _ in range(prompt_len)]
    kv = SegmentKVManager(prompt_len // block_size + 2, block_size)
    warm = SequenceGroup("warm", prompt, SamplingParams(), 0.0)
    kv.admit(warm)
    warm.prompt_computed = prompt_len
    kv.commit_prompt(warm)
    kv.free_group(warm)

    def admission() -> None:
        group = SequenceGroup("g", prompt, SamplingParams(), 0.0)
        kv._prefix_hits(group)  # keys every block, then checks every cached one's tokens

    whole = per_call(admission, max(1, repeats // 100))
    blocks = prompt_len // block_size
    return (f"prefix-cache keys, block_size {block_size}: sha256 {sha * 1e6:.2f} us/block, "
            f"hash() {old * 1e6:.2f} us/block ({sha / old:.1f}x); a {prompt_len}-token prompt "
            f"all cached: {whole * 1e3:.3f} ms to key and verify its {blocks} blocks "
            f"({whole / blocks * 1e6:.2f} us/block)")


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


def measure_bandwidth(device: torch.device, mib: int,
                      repeats: int = 9) -> tuple[list[float], list[float]]:
    """Samples of (read GB/s from a sum, copy GB/s counting read + write). The tensor is far
    larger than any cache, so this is DRAM/HBM bandwidth."""
    sync = synchronizer(device)
    n = mib * 2**20 // 4
    x = torch.randn(n, dtype=torch.float32, device=device)  # random: zeros can run faster
    y = torch.empty_like(x)
    y.copy_(x)
    nbytes = x.numel() * x.element_size()
    read = [nbytes / timed(lambda: x.sum(), sync) / 1e9 for _ in range(repeats)]
    copy = [2 * nbytes / timed(lambda: y.copy_(x), sync) / 1e9 for _ in range(repeats)]
    return read, copy


def bandwidth_floor(read: list[float], copy: list[float]) -> tuple[float, float]:
    """(GB/s the floors use, the read p50). Medians, not bests: the decode step is a median
    too, and a shared host's bandwidth swings (25-49 GB/s for the same sum, seconds apart, on
    this project's 2-core box), so a best-of-N would be a peak no sustained read sees."""
    return max(statistics.median(read), statistics.median(copy)), statistics.median(read)


def measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate in TFLOP/s on random data, best of 5 each: torch at the serving dtype;
    on CPU also float32 and, for bf16, cpu_native's packed kernel. Where torch has no fast bf16
    matmul (AVX2 CPUs) the hardware's rate is what float32 or our kernel reach, not torch's
    fallback, so the compute floor takes the best of them."""
    n = 8192 if device.type != "cpu" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = synchronizer(device)
    products = [lambda: a @ b]
    if device.type == "cpu":
        a32, b32 = a.float(), b.float()
        products.append(lambda: a32 @ b32)
        lib = cpu_native.load() if dtype == torch.bfloat16 else None
        if lib is not None:
            packed = cpu_native.pack(b)
            products.append(lambda: cpu_native.linear(lib, a, packed))
    best = float("inf")
    for product in products:
        product()
        best = min(best, *(timed(product, sync) for _ in range(5)))
    return 2 * n**3 / best / 1e12


def weight_bytes_per_step(core: EngineCore) -> int:
    """Bytes a decode step must read: every parameter except the embedding table, of which a step
    reads one row per token (the LM head is its own matrix in our model, tied or not)."""
    return sum(p.numel() * p.element_size() for name, p in core.runner.model.named_parameters()
               if not name.startswith("embed_tokens"))


def kv_bytes_per_token(core: EngineCore) -> int:
    return core.runner.block_bytes() // core.runner.block_size


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


# ----- ours ------------------------------------------------------------------------------------
def run_ours(core: EngineCore, prompts: dict[int, list[list[int]]], warm: dict[int, list],
             output_len: int) -> dict[int, BatchTiming]:
    out = {}
    for b, batch in prompts.items():
        measure_batch(core, warm[b], min(output_len, 8))  # warm-up at this shape
        out[b] = measure_batch(core, batch, output_len)
    return out


def run_prefill(core: EngineCore, prompt: list[int], sync: Callable[[], None]) -> float:
    """Seconds from submission to the first token of one long prompt (one step if the step's
    token budget holds it), best of 3 on fresh prompts' positions (a new first token each time,
    so the prefix cache never serves it)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    best = float("inf")
    for i in range(4):
        ids = [(i + 1) % len(prompt)] + prompt[1:]
        core.add_request(ids, params)
        t = timed(lambda: [core.step() for _ in iter(core.has_work, False)], sync)
        if i:  # the first run compiles kernels at this shape
            best = min(best, t)
    return best


def run_beam(core: EngineCore, prompt: list[int], width: int, output_len: int,
             sync: Callable[[], None]) -> tuple[float, int, int]:
    """(median step s once the beams run, KV tokens stored, KV tokens the beams see)."""
    params = SamplingParams(max_tokens=output_len, beam_width=width, ignore_eos=True)
    for _ in range(2):  # the first run compiles kernels at the beam shapes
        core.add_request(prompt, params)
        steps, stored, logical = [], 0, 0
        while core.has_work():
            steps.append(timed(core.step, sync))
            m = core.kv.metrics()
            if m.tokens_logical > logical:
                stored, logical = m.tokens_stored, m.tokens_logical
        prompt = [(prompt[0] + 1) % core.spec.vocab_size] + prompt[1:]
    return statistics.median(steps[2:]), stored, logical


def profile_step(core: EngineCore, batch: list[list[int]], beam_width: int = 0) -> str:
    """A torch.profiler table of decode steps at this batch size (steady state: the lookahead
    keeps one step in flight), with kernels per step, GPU busy time and wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                            beam_width=max(beam_width, 1))
    ids = {core.add_request(p, params) for p in batch}
    started: set[str] = set()
    while started != ids and not beam_width:  # prefill until every request has its first token
        started |= {d.request_id for d in core.step() if d.token_ids}
    for _ in range(4 if beam_width else 2):  # the steady state (a greedy step in flight)
        core.step()
    device = torch.device(core.config.device)
    sync = synchronizer(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    steps = 3
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            core.step()
        wall = (time.perf_counter() - t) / steps
    while core.has_work():
        core.step()
    sync()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in events) / steps if events else 0.0
    table = prof.key_averages().table(
        sort_by="cuda_time_total" if events else "cpu_time_total", row_limit=15)
    what = f"beam {beam_width}" if beam_width else f"batch {len(batch)}"
    return (f"{table}\n{what}, per decode step (mean of {steps}): "
            f"{len(events) / steps:.0f} GPU kernels/copies, GPU busy "
            f"{busy_us / 1e3:.3f} ms, step wall {wall * 1e3:.3f} ms, GPU idle "
            f"{max(wall * 1e3 - busy_us / 1e3, 0):.3f} ms")


# ----- CPU kernels -------------------------------------------------------------------------------
def run_cpu_figures(args: argparse.Namespace, core: EngineCore, dtype: torch.dtype) -> dict:
    spec = core.spec
    out: dict = {"kv": cpu_kernels.kv_bytes_per_token(spec.num_layers, spec.num_kv_heads,
                                                      spec.head_dim, dtype),
                 "kv_metrics": core.kv.metrics().bytes_per_token}
    if args.attn_len:
        out["attn"] = cpu_kernels.prefill_attention(spec.num_heads, spec.num_kv_heads,
                                                    spec.head_dim, dtype, args.attn_len)
    if args.linear:
        out["linear"] = {rows: cpu_kernels.linear_layers(core.runner.model, rows)
                         for rows in (1, 16)}
    if args.elementwise:
        out["elementwise"] = cpu_kernels.elementwise(
            spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, dtype, [1, 16, 64, 256, 1024])
    return out


def print_cpu_figures(fig: dict, args: argparse.Namespace) -> None:
    if not fig:
        return
    kv = fig["kv"]
    print(f"\n== KV bytes per token (all layers, K+V): {args.dtype} {kv['auto']}, int8 "
          f"{kv['int8']} with its scales ({ratio(kv['int8'], kv['auto'])}); our engine "
          f"(kv_dtype {args.kv_dtype}) reports {fig['kv_metrics']} ==")
    if "attn" in fig:
        a = fig["attn"]
        print(f"\n== prefill attention, {args.attn_len} tokens, one layer (ms) ==")
        for name in ("slim", "slim int8", "slim torch", "sdpa", "reference"):
            print(f"{name:>10} {a[name] * 1e3:>9.2f}  SlimAttention "
                  f"{ratio(a[name], a['slim'])} faster")
    for rows, table in fig.get("linear", {}).items():
        print(f"\n== linear layers, {rows} token(s): plain F.linear, pre-packed oneDNN, "
              f"cpu_native's bf16 kernel (ms, weight GB/s) ==")
        print(f"{'out x in':>14} {'plain':>8} {'GB/s':>6} {'oneDNN':>8} {'GB/s':>6} "
              f"{'native':>8} {'GB/s':>6}")
        for o, i, pm, pg, dm, dg, nm, ng in table:
            print(f"{f'{o} x {i}':>14} {pm:>8.3f} {pg:>6.1f} {dm:>8.3f} {dg:>6.1f} "
                  f"{nm:>8.3f} {ng:>6.1f}")
    if "elementwise" in fig:
        print("\n== element-wise chains (us): eager vs Inductor-compiled ==")
        for op, rows, e, c in fig["elementwise"]:
            print(f"{op:>14} {rows:>6} rows {e:>10.1f} {c:>10.1f}  ({ratio(e, c)})")


# ----- HF transformers -------------------------------------------------------------------------
def run_hf(path: Path, device: torch.device, dtype: torch.dtype, prompts: dict[int, list],
           output_len: int, repeats: int, compiled: bool,
           beam_prompt: list[int] | None = None, beam_width: int = 0) -> dict:
    """HF generate: ``{"step": s/token at batch 1, "tput": {batch: tok/s}, "beam_step": s,
    "attn": impl}``; with ``compiled``, static cache + torch.compile. A batch size that fails
    (out of memory, compile error) is reported as missing, not fatal."""
    from segserve.models.gguf import is_gguf
    from transformers import AutoModelForCausalLM

    # A GGUF: HF dequantizes the same file (to dtype), so both run the same weights.
    where, extra = (path.parent, {"gguf_file": path.name}) if is_gguf(path) else (path, {})
    model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, **extra)
    model = model.to(device).eval()
    if compiled:
        # generate() compiles the decode forward itself for a static cache (its CompileConfig:
        # inductor, fullgraph, CUDA graphs), marking each step for the graph trees.
        model.generation_config.cache_implementation = "static"
    sync = synchronizer(device)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0

    def generate(batch: list[list[int]], new_tokens: int, **kw) -> float:
        ids = torch.tensor(batch, device=device)

        def call() -> None:
            # min_new_tokens keeps EOS from ending a row early: every row makes new_tokens.
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=pad, **kw)
        return timed(call, sync)

    def per_token(batch, **kw) -> float:
        short, long = max(2, output_len // 4), output_len
        generate(batch, short, **kw)  # warm-up (and compile)
        generate(batch, long, **kw)
        t_short = statistics.median(generate(batch, short, **kw) for _ in range(repeats))
        t_long = statistics.median(generate(batch, long, **kw) for _ in range(repeats))
        return (t_long - t_short) / (long - short)

    out: dict = {"tput": {}, "step": float("nan"), "beam_step": float("nan"),
                 "attn": getattr(model.config, "_attn_implementation", "?")}
    for b, batch in prompts.items():
        try:
            if b == 1:
                out["step"] = per_token(batch)
            generate(batch, 2)  # warm-up at this batch size
            t = statistics.median(generate(batch, output_len) for _ in range(repeats))
            out["tput"][b] = b * output_len / t
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  HF{' compiled' if compiled else ''} batch {b} failed: "
                  f"{type(e).__name__}: {str(e)[:200]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if beam_prompt is not None and beam_width > 1:
        out["beam_step"] = per_token([beam_prompt], num_beams=beam_width)
    return out  # the model is freed with this frame


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and a == a and b == b else "-"


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prefix_keys:
        print(measure_prefix_keys(args.block_size))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only, never the network
    device = torch.device(args.device)
    sync = synchronizer(device)
    dtype = resolve_dtype(args.dtype)
    model = (str(build_random_checkpoint(args.random_shape, args.dtype, device))
             if args.random_shape else args.model)

    sizes = sorted(set(args.batch_sizes) | {1})  # batch 1 always: it gives the latency
    max_b = max(sizes + ([args.beam_width] if args.beam_width else []))
    seq_len = args.input_len + args.output_len
    blocks = kv_blocks_needed(max_b, args.input_len, args.output_len, args.block_size)
    blocks += 2 * (-(-args.prefill_len // args.block_size))
    threads = ", " + set_cpu_threads(args.threads, dtype) if device.type == "cpu" else ""
    config = EngineConfig(
        model=model, device=args.device, dtype=args.dtype, block_size=args.block_size,
        kv_dtype=args.kv_dtype,
        # The engine applies its thread count at start: the probe's choice, on the CPU.
        cpu_threads=torch.get_num_threads() if device.type == "cpu" else None,
        kernel_backend=args.kernel_backend, max_num_seqs=max_b, seed=args.seed,
        cuda_graphs=not args.no_cuda_graphs,
        # Sized to the workload, so a GPU run leaves memory for the HF model loaded after ours.
        num_kv_blocks=blocks,
        max_num_batched_tokens=max(2048, args.prefill_len, max_b * args.input_len // 4),
        max_model_len=max(seq_len, args.prefill_len + 1, 64),
    )
    if args.tp > 1:  # the scaling comparison alone: two engines of this model in one run
        config = dataclasses.replace(config, communicator=args.communicator)
        tp_scaling.run(args, config, sizes)
        return 0
    t = time.perf_counter()
    core = EngineCore(config)
    load_s = time.perf_counter() - t
    if seq_len > core.spec.max_position_embeddings:
        raise SystemExit(f"input-len + output-len exceeds the model's max length "
                         f"{core.spec.max_position_embeddings}")

    rng = random.Random(args.seed)
    vocab = core.spec.vocab_size
    prompts = {b: random_prompts(rng, vocab, b, args.input_len) for b in sizes}
    warm = {b: random_prompts(rng, vocab, b, args.input_len) for b in sizes}

    nparams = sum(p.numel() for p in core.runner.model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    load = f", load avg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    graphs = core.runner.decode is not None and core.runner.decode.use_graphs
    backend = core.runner.backend
    describe = backend.describe() if hasattr(backend, "describe") else backend.name
    print(f"model {Path(model).name} ({nparams / 1e6:.1f}M params), {name} {args.dtype}{threads}"
          f"{load}; backend {describe}, kv_dtype {args.kv_dtype}, CUDA graphs "
          f"{'on' if graphs else 'off'}, engine ready in {load_s:.1f} s; input {args.input_len}, "
          f"output {args.output_len} tokens, greedy", flush=True)
    if core.runner.cpu_placement:
        print(core.runner.cpu_placement)

    mib = args.bandwidth_mib or (512 if device.type == "cpu" else 4096)
    reads, copies = measure_bandwidth(device, mib)
    bw, read_bw = (v * 1e9 for v in bandwidth_floor(reads, copies))
    tflops = measure_matmul(device, dtype)
    wbytes = weight_bytes_per_step(core)
    kv_tok = kv_bytes_per_token(core)
    floor1 = wbytes / bw
    print(f"bandwidth ({mib} MiB, p50 of {len(reads)}): read {read_bw / 1e9:.0f} GB/s (best "
          f"{max(reads):.0f}), copy {statistics.median(copies):.0f} GB/s (read+write; best "
          f"{max(copies):.0f}) -> {bw / 1e9:.0f} GB/s; {args.dtype} matmul {tflops:.3g} TFLOP/s "
          "(best implementation here)")
    print(f"weights read per decode step {wbytes / 1e9:.3f} GB -> floor {floor1 * 1e3:.3f} ms; "
          f"KV {kv_tok / 1024:.0f} KiB per token", flush=True)

    ours = run_ours(core, prompts, warm, args.output_len)
    print("\nsegserve engine alone:")
    print(format_table([ours[b] for b in sizes]), flush=True)
    # Sampled again after our steps: the floors use the p50 of both sets, which bracket them.
    more_reads, more_copies = measure_bandwidth(device, mib)
    reads, copies = reads + more_reads, copies + more_copies
    bw, read_bw = (v * 1e9 for v in bandwidth_floor(reads, copies))
    floor1 = wbytes / bw
    print(f"bandwidth again after our steps: read p50 {statistics.median(more_reads):.0f} GB/s; "
          f"the floors use the p50 of all {len(reads)}: read {read_bw / 1e9:.0f}, -> "
          f"{bw / 1e9:.0f} GB/s, floor {floor1 * 1e3:.3f} ms", flush=True)

    prefill_s = beam = greedy_w = float("nan")
    beam_kv = (0, 0)
    if args.prefill_len:
        prefill_s = run_prefill(core, random_prompts(rng, vocab, 1, args.prefill_len)[0], sync)
    if args.beam_width > 1:
        bprompt = random_prompts(rng, vocab, 1, args.input_len)[0]
        beam, *beam_kv = run_beam(core, bprompt, args.beam_width, min(args.output_len, 64), sync)
        greedy_w = measure_batch(core, random_prompts(rng, vocab, args.beam_width,
                                                      args.input_len), 32).decode_p50_s
    cpu_figures = run_cpu_figures(args, core, dtype) if device.type == "cpu" else {}
    profiles = []
    if args.profile:
        for b in sorted({1, max(sizes)}):
            profiles.append(profile_step(core, random_prompts(rng, vocab, b, args.input_len)))
        if args.beam_width > 1:
            profiles.append(profile_step(core, random_prompts(rng, vocab, 1, args.input_len),
                                         args.beam_width))
    model_dir = core.model_path
    # Free our engine before HF loads: on a GPU both 7B copies plus HF's cache may not fit.
    del core
    free_device(device)

    hf_prompts = {b: random_prompts(rng, vocab, b, args.input_len) for b in args.hf_batch_sizes}
    hf = hfc = {"tput": {}, "step": float("nan"), "beam_step": float("nan"), "attn": "-"}
    if not args.skip_hf:
        beam_prompt = random_prompts(rng, vocab, 1, args.input_len)[0]
        hf = run_hf(model_dir, device, dtype, hf_prompts, args.output_len, args.repeats, False,
                    beam_prompt, args.beam_width)
        free_device(device)
        if args.hf_compile_batch_sizes and device.type == "cuda":
            cprompts = {b: random_prompts(rng, vocab, b, args.input_len)
                        for b in args.hf_compile_batch_sizes}
            try:
                hfc = run_hf(model_dir, device, dtype, cprompts, args.output_len, args.repeats,
                             True)
            except Exception as e:  # noqa: BLE001 - compile may not run everywhere
                print(f"  HF static cache + torch.compile failed: {type(e).__name__}: "
                      f"{str(e)[:200]}")
            free_device(device)

    for text in profiles:
        print("\n" + text)
    print(f"\n== decode step (ms); floor = (weights + KV read at mean context "
          f"{args.input_len + args.output_len // 2}) / {bw / 1e9:.0f} GB/s; compute = "
          f"2 x weights' params x batch / {tflops:.2f} TFLOP/s ==")
    print(f"{'batch':>6} {'floor':>8} {'compute':>8} {'ours':>8} {'ours/floor':>11} "
          f"{'ours/max':>9} {'GB/s':>7}")
    wparams = wbytes / torch.empty((), dtype=dtype).element_size()
    for b in sizes:
        kv = b * (args.input_len + args.output_len // 2) * kv_tok
        step = ours[b].decode_p50_s
        floor, compute = (wbytes + kv) / bw, 2 * wparams * b / (tflops * 1e12)
        print(f"{b:>6} {floor * 1e3:>8.3f} {compute * 1e3:>8.3f} {step * 1e3:>8.3f} "
              f"{ratio(step, floor):>11} {ratio(step, max(floor, compute)):>9} "
              f"{(wbytes + kv) / step / 1e9:>7.0f}")
    print(f"\n== batch-1 decode step (ms): floor {floor1 * 1e3:.3f}, ours "
          f"{ours[1].decode_p50_s * 1e3:.3f} ({ratio(ours[1].decode_p50_s, floor1)} floor; "
          f"{ratio(ours[1].decode_p50_s, wbytes / read_bw)} the read-bandwidth floor "
          f"{wbytes / read_bw * 1e3:.3f}), "
          f"HF eager {hf['step'] * 1e3:.3f} (attn {hf['attn']}), HF static+compile "
          f"{hfc['step'] * 1e3:.3f}")
    print(f"\n== throughput (generated tok/s, prefill included), {args.input_len} in / "
          f"{args.output_len} out ==")
    print(f"{'batch':>6} {'ours':>10} {'HF eager':>10} {'HF compiled':>12}")
    for b in sorted(set(sizes) | set(hf["tput"]) | set(hfc["tput"])):
        o = ours[b].tokens_per_s if b in ours else float("nan")
        print(f"{b:>6} {o:>10.1f} {hf['tput'].get(b, float('nan')):>10.1f} "
              f"{hfc['tput'].get(b, float('nan')):>12.1f}")
    best_b = max(ours, key=lambda b: ours[b].tokens_per_s)
    if hf["tput"]:
        hf_b = max(hf["tput"], key=hf["tput"].__getitem__)
        print(f"ours best (batch {best_b}) {ours[best_b].tokens_per_s:.0f} tok/s vs HF eager best "
              f"(batch {hf_b}) {hf['tput'][hf_b]:.0f} tok/s: "
              f"{ratio(ours[best_b].tokens_per_s, hf['tput'][hf_b])}")
    if args.prefill_len:
        mm_floor = 2 * nparams * args.prefill_len / (tflops * 1e12)
        print(f"\n== prefill {args.prefill_len} tokens: ours {prefill_s * 1e3:.2f} ms, matmul "
              f"floor {mm_floor * 1e3:.2f} ms ({ratio(prefill_s, mm_floor)} floor) ==")
    print_cpu_figures(cpu_figures, args)
    if args.beam_width > 1:
        stored, logical = beam_kv
        print(f"\n== beam {args.beam_width}: step {beam * 1e3:.3f} ms vs our greedy batch "
              f"{args.beam_width} {greedy_w * 1e3:.3f} ms ({ratio(beam, greedy_w)}), HF beam "
              f"step {hf['beam_step'] * 1e3:.3f} ms; KV stored {stored} tokens "
              f"({stored * kv_tok / 2**20:.1f} MiB) for {logical} tokens the beams see ==")
    if hasattr(os, "getloadavg"):
        print(f"\nload avg at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
