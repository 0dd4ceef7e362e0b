"""Row-wise reductions over logits whose vocabulary is split between tensor-parallel ranks.

Each rank holds columns ``[lo, hi)`` of every logits row. Sampling, log-probs and beam search
need only a few global facts per row: the log-sum-exp, the best k (value, id) pairs, the value
at a given id. Each rank computes its local part and only those parts are gathered, never the
full logits. With one rank, every method is the plain torch op the single-device engine has
always used, so TP=1 runs exactly the code it ran before.
"""

from __future__ import annotations

import torch

from .communicator import Communicator

NEG_INF = float("-inf")


class VocabShard:
    def __init__(self, vocab: int, lo: int = 0, hi: int | None = None,
                 comm: Communicator | None = None) -> None:
        self.vocab, self.lo = vocab, lo
        self.hi = vocab if hi is None else hi
        self.comm = comm or Communicator()

    @property
    def sharded(self) -> bool:
        return self.comm.world_size > 1

    def global_ids(self, n: int, device: torch.device) -> torch.Tensor:
        """The global token ids of this rank's ``n`` columns."""
        return torch.arange(self.lo, self.lo + n, device=device, dtype=torch.int64)

    def localize(self, rows: list[int], toks: list[int]) -> tuple[list[int], list[int]]:
        """The (row, token) pairs whose token is this rank's, with local column indices."""
        if not self.sharded:
            return rows, toks
        keep = [(r, t - self.lo) for r, t in zip(rows, toks, strict=True)
                if self.lo <= t < self.hi]
        return [r for r, _ in keep], [t for _, t in keep]

    # ----- reductions ---------------------------------------------------------------------
    def lse(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows]`` log-sum-exp over the whole vocabulary."""
        if not self.sharded:
            return torch.logsumexp(x, dim=-1)
        m = x.amax(-1)
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = (x - safe[:, None]).exp().sum(-1)
        parts = self.comm.all_gather(torch.stack([safe, s]))  # [W, 2, rows]
        big = parts[:, 0].amax(0)
        total = (parts[:, 1] * (parts[:, 0] - big).exp()).sum(0)
        return big + total.log()

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return torch.log_softmax(x, dim=-1)
        return x - self.lse(x)[:, None]

    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, global ids)``, ``[rows, k]``, best first."""
        if not self.sharded:
            return torch.topk(x, k, dim=-1)
        kk = min(k, x.shape[-1])
        vals, idx = torch.topk(x, kk, dim=-1)
        vals_all = self.comm.all_gather(vals)  # [W, rows, kk]
        ids_all = self.comm.all_gather(idx + self.lo)
        vals_all = vals_all.permute(1, 0, 2).reshape(x.shape[0], -1)
        ids_all = ids_all.permute(1, 0, 2).reshape(x.shape[0], -1)
        best, pos = torch.topk(vals_all, k, dim=-1)
        return best, ids_all.gather(1, pos)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows]`` global ids; ties go to the lowest id, as ``torch.argmax`` does."""
        if not self.sharded:
            return torch.argmax(x, dim=-1)
        vals, idx = x.max(dim=-1)
        vals_all = self.comm.all_gather(vals)  # [W, rows]
        ids_all = self.comm.all_gather(idx + self.lo)
        best = torch.argmax(vals_all, dim=0)  # first (lowest-rank) maximum
        return ids_all.gather(0, best[None])[0]

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return x.amax(-1)
        return self.comm.all_gather(x.amax(-1)).amax(0)

    def take(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``x[row, ids[row]]`` per row, for global ids."""
        if not self.sharded:
            return x.gather(1, ids[:, None])[:, 0]
        local = ids - self.lo
        mine = (local >= 0) & (local < x.shape[-1])
        vals = x.gather(1, local.clamp(0, x.shape[-1] - 1)[:, None])[:, 0]
        vals = torch.where(mine, vals, torch.full_like(vals, NEG_INF))
        return self.comm.all_gather(vals).amax(0)

    def topk_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best ``k`` of all ``rows x vocab`` entries, as (values, row * vocab + id)."""
        if not self.sharded:
            return torch.topk(x.reshape(-1), k)
        rows, width = x.shape
        kk = min(k, x.numel())
        vals, flat = torch.topk(x.reshape(-1), kk)
        gid = (flat // width) * self.vocab + flat % width + self.lo
        vals_all = self.comm.all_gather(vals).reshape(-1)
        ids_all = self.comm.all_gather(gid).reshape(-1)
        best, pos = torch.topk(vals_all, k)
        return best, ids_all[pos]

    # ----- the sampling filters -------------------------------------------------------------
    def filter(self, x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor) -> torch.Tensor:
        """:func:`sampler.filter_rows` on vocabulary shards: the same masks, from gathered
        thresholds. top-p's nucleus is found among the ``TOP_P_CANDIDATES`` best tokens of
        every rank (exact whenever the nucleus is no larger; past that it is cut there)."""
        from .sampler import filter_rows

        if not self.sharded:
            return filter_rows(x, top_k, top_p, min_p)
        off = (top_k <= 0) | (top_k >= self.vocab)
        if not bool(off.all()):
            k = torch.where(off, 1, top_k)
            vals, _ = self.topk(x, int(k.max()))
            kth = vals.gather(1, (k - 1)[:, None])
            kth = torch.where(off[:, None], torch.full_like(kth, NEG_INF), kth)
            x = x.masked_fill(x < kth, NEG_INF)
        if bool((top_p < 1.0).any()):
            cand, _ = self.topk(x, min(TOP_P_CANDIDATES, self.vocab))
            probs = (cand - self.lse(x)[:, None]).exp()
            keep = ~((probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None])
            # the smallest kept candidate value is the cut
            last = keep.sum(-1, keepdim=True).clamp(min=1) - 1
            cut = cand.gather(1, last)
            cut = torch.where((top_p < 1.0)[:, None], cut, torch.full_like(cut, NEG_INF))
            x = x.masked_fill(x < cut, NEG_INF)
        if bool((min_p > 0.0).any()):
            lse, best = self.lse(x), self.amax(x)
            probs = (x - lse[:, None]).exp()
            floor = min_p[:, None] * (best - lse).exp()[:, None]
            x = x.masked_fill(probs < floor, NEG_INF)
        return x


# top-p over vocabulary shards looks for its nucleus among this many tokens per rank.
TOP_P_CANDIDATES = 1024
