"""Run the engine on a GPU against HF transformers on the same GPU, on tiny random models of
every family: greedy (single and batched) and beam search must be token-identical in float32.
Then time batch-1 decode on the demo model. Prints a short table last.

    python bench/cuda_check.py [--device cuda]

Runs without Ray and without installing segserve (see the PYTHONPATH note in README).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FAMILIES, hf_beams, hf_greedy, make_model  # noqa: E402
from segserve import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = args.device
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            path = Path(tmp) / family
            hf = make_model(path, family).to(dev)
            llm = LLM(str(path), device=dev, block_size=4, max_num_batched_tokens=64)
            prompts = [
                [0] + [rng.randrange(3, 256) for _ in range(rng.randint(2, 80))] for _ in range(5)
            ]
            greedy = SamplingParams(max_tokens=12, temperature=0.0)
            outs = llm.generate(prompts, greedy)
            g_ok = sum(
                o.outputs[0].token_ids == hf_greedy(hf, p, 12)
                for p, o in zip(prompts, outs, strict=True)
            )
            b_ok = 0
            for p in prompts[:2]:
                ours = [
                    c.token_ids
                    for c in llm.generate([p], SamplingParams(max_tokens=8, beam_width=4))[
                        0
                    ].outputs
                ]
                b_ok += ours == hf_beams(hf, p, 8, 4)
            rows.append((family, f"{g_ok}/5", f"{b_ok}/2"))
            del llm, hf
            torch.cuda.empty_cache() if dev.startswith("cuda") else None
    llm = LLM("demo", device=dev, dtype="bfloat16")
    p = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    llm.generate([[0, 5, 6]], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate([[0, 5, 6]], p)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t) / 128 * 1e3
    print(f"\ndevice {torch.cuda.get_device_name() if dev.startswith('cuda') else dev}")
    print(f"{'family':10} {'greedy==HF':>11} {'beam4==HF':>10}")
    for r in rows:
        print(f"{r[0]:10} {r[1]:>11} {r[2]:>10}")
    print(f"demo model bf16, batch 1: {step_ms:.2f} ms per generated token (reference backend)")


if __name__ == "__main__":
    main()
