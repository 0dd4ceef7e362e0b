"""``bench/offline.py --tp N``: the replica group's decode step against one rank's.

The same checkpoint runs as TP=1, then as TP=N (ranks started as local processes, so it runs
where Ray is not installed, such as the GPU machine). Printed per batch size: both steps, their
ratio and the ideal 1/N; on CPU also the all-reduce latency of gloo against oneCCL for one
hidden-state-sized bf16 tensor (bench/collectives.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

import torch
from segserve.actors import EngineConfig, EngineCore
from segserve.actors.benchmark import measure_batch, random_prompts


def decode_steps(config: EngineConfig, sizes: list[int], input_len: int, output_len: int,
                 seed: int) -> dict[int, float]:
    """Median decode step (s) per batch size, after a warm-up at each shape."""
    import random

    core = EngineCore(config)
    rng = random.Random(seed)
    vocab = core.spec.vocab_size
    out = {}
    try:
        for b in sizes:
            measure_batch(core, random_prompts(rng, vocab, b, input_len), 8)
            out[b] = measure_batch(core, random_prompts(rng, vocab, b, input_len),
                                   output_len).decode_p50_s
    finally:
        core.shutdown()
        del core
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def run(args: argparse.Namespace, config: EngineConfig, sizes: list[int]) -> None:
    tp = args.tp
    one = decode_steps(dataclasses.replace(config, tensor_parallel_size=1), sizes,
                       args.input_len, args.output_len, args.seed)
    group = decode_steps(dataclasses.replace(config, tensor_parallel_size=tp,
                                             tp_launcher="processes"),
                         sizes, args.input_len, args.output_len, args.seed)
    print(f"\n== tensor parallelism: decode step (ms), TP={tp} against TP=1, "
          f"{args.input_len} in / {args.output_len} out, {config.communicator} ==")
    print(f"{'batch':>6} {'TP=1':>9} {f'TP={tp}':>9} {'ratio':>7} {'ideal':>7}")
    for b in sizes:
        print(f"{b:>6} {one[b] * 1e3:>9.3f} {group[b] * 1e3:>9.3f} {group[b] / one[b]:>7.3f} "
              f"{1 / tp:>7.3f}")
    if torch.device(config.device).type == "cpu":
        from collectives import allreduce_latency, format_latency  # bench/collectives.py

        lat = allreduce_latency(world_size=tp, numel=4096, dtype=torch.bfloat16)
        print("\n== " + format_latency(lat, tp, 4096, torch.bfloat16))
