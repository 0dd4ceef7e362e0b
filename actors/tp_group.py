"""The replica group's control path: rank 0 leads, the other ranks follow.

Rank 0 (the engine's own :class:`ModelRunner`) owns the scheduler and the KV manager. For each
step it broadcasts, over the group's communicator, the step's inputs (token ids, positions, KV
slots, block tables, block copies), then runs the step itself; every sampling op it then runs on
the step's logits is broadcast the same way first. The other ranks sit in :func:`follow`, doing
what each message says on their own shard, so every collective inside the model and the sampler
meets its partner. Shutdown travels the same way.
"""

from __future__ import annotations

import logging

import torch

from .model_runner import ModelRunner
from .sampler import OPS

logger = logging.getLogger(__name__)


class ShardedLogits:
    """Rank 0's view of a step's logits, whose vocabulary is split over the group: this rank's
    slice, the rows picked so far, and the step it came from. The sampler runs ops on it
    through :meth:`run_op`, never on full logits."""

    def __init__(self, runner: ModelRunner, step: int, local: torch.Tensor,
                 rows: list[int] | None = None) -> None:
        self.runner, self.step, self.local, self.rows = runner, step, local, rows

    @property
    def shape(self) -> tuple[int, int]:
        n = self.local.shape[0] if self.rows is None else len(self.rows)
        return n, self.runner.spec.vocab_size

    @property
    def device(self) -> torch.device:
        return self.local.device

    def __getitem__(self, rows: list[int]) -> ShardedLogits:
        rows = [int(r) for r in rows]
        if self.rows is not None:
            rows = [self.rows[r] for r in rows]
        return ShardedLogits(self.runner, self.step, self.local, rows)

    def run_op(self, op: str, plan: object):
        self.runner.command(("op", op, self.step, self.rows, plan))
        return OPS[op](_pick(self.local, self.rows), plan, self.runner.vocab)


def _pick(logits: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    if rows is None:
        return logits
    return logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]


def follow(runner: ModelRunner) -> None:
    """A rank > 0: run what rank 0 sends until it says stop (or the communicator fails: a
    collective's timeout or a dead peer raises, and the worker ends)."""
    comm = runner.comm
    with torch.inference_mode():
        while True:
            cmd = comm.broadcast_object(None)
            kind = cmd[0]
            if kind == "stop":
                logger.info("rank %d: stop", comm.rank)
                return
            try:
                _run(runner, cmd)
            except Exception:  # rank 0 ran the same and failed the same requests
                logger.exception("rank %d: %s failed", comm.rank, kind)


def _run(runner: ModelRunner, cmd: tuple) -> None:
    kind = cmd[0]
    if kind == "decode":
        _, copies, rows, n, snap, ids_on_device = cmd
        runner.decode.inputs.load(snap)
        runner.keep_logits(runner.run_decode(copies, rows, n, None, ids_on_device))
    elif kind == "prefill":
        _, copies, inputs, plan = cmd
        logits, _ = runner.run_prefill(copies, inputs, plan)
        runner.keep_logits(logits)
    elif kind == "op":
        _, op, step, rows, plan = cmd
        OPS[op](_pick(runner.logits_by_step[step], rows), plan, runner.vocab)
    else:
        raise ValueError(f"unknown command {kind!r}")


def stop_followers(runner: ModelRunner) -> None:
    """Rank 0: tell the other ranks to leave :func:`follow`."""
    if runner.tp_size > 1:
        try:
            runner.command(("stop",))
        except Exception:  # a dead group cannot be told; its workers are killed instead
            logger.warning("could not tell the replica group to stop", exc_info=True)
