"""What the tensor-parallel tests share (and the GPU machine can import: no Ray here)."""

from __future__ import annotations

PROMPTS = [[0, 5, 9, 33, 70, 2, 44], [0, 17, 200, 3, 3, 81, 120, 7, 99, 14, 240, 6, 31]]


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def assert_logprobs_close(a, b) -> None:
    for oa, ob in zip(a, b, strict=True):
        for ca, cb in zip(oa.outputs, ob.outputs, strict=True):
            assert (ca.logprobs is None) == (cb.logprobs is None)
            for ea, eb in zip(ca.logprobs or [], cb.logprobs or [], strict=True):
                assert ea.token_id == eb.token_id
                assert abs(ea.logprob - eb.logprob) <= 1e-5
                assert [t for t, _ in ea.top] == [t for t, _ in eb.top]
                assert max((abs(x - y) for (_, x), (_, y) in zip(ea.top, eb.top,
                                                                 strict=True)), default=0) <= 1e-5
