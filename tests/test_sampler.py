"""actors/sampler.py on hand-made logits (filters, penalties, greedy, seeded sampling, logprobs),
then the same knobs through the engine on a tiny model: seeded n-sampling, stop strings, stop
token ids, ignore_eos and logprobs, checked against HF forward passes of the same checkpoint."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import hf_greedy_no_eos, make_model
from segserve import LLM, SamplingParams
from segserve.actors.outputs import TokenLogprob
from segserve.actors.sampler import apply_constraints, apply_penalties, filter_logits, sample
from segserve.actors.sequence import Sequence, SequenceGroup

NEG_INF = float("-inf")


def make_seq(params: SamplingParams, prompt=(0,), output=(), seed: int | None = None) -> Sequence:
    group = SequenceGroup("r", list(prompt), params, 0.0)
    seq = Sequence(group, output_ids=list(output))
    if seed is not None:
        seq.sample_seed = seed
    group.seqs.append(seq)
    return seq


def kept(row: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(row.tolist()) if v != NEG_INF}


# Probabilities by token id; sorted best first the ids are 1 (.5), 3 (.2), 4 (.15), 2 (.1), 0 (.05).
PROBS = [0.05, 0.5, 0.1, 0.2, 0.15]
ROW = torch.tensor([math.log(p) for p in PROBS], dtype=torch.float32)


# ----- filter_logits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_k,top_p,min_p,expected",
    [
        (0, 1.0, 0.0, {0, 1, 2, 3, 4}),  # everything off
        (2, 1.0, 0.0, {1, 3}),
        (3, 1.0, 0.0, {1, 3, 4}),
        (5, 1.0, 0.0, {0, 1, 2, 3, 4}),  # k >= vocab: no-op
        (9, 1.0, 0.0, {0, 1, 2, 3, 4}),
        # top-p keeps the smallest best-first set whose mass reaches p: masses before each
        # token (best first) are 0, .5, .7, .85, .95
        (0, 0.01, 0.0, {1}),  # the best token always stays
        (0, 0.4, 0.0, {1}),
        (0, 0.6, 0.0, {1, 3}),
        (0, 0.75, 0.0, {1, 3, 4}),
        (0, 0.9, 0.0, {1, 2, 3, 4}),
        (0, 0.99, 0.0, {0, 1, 2, 3, 4}),
        # min-p keeps tokens with p >= min_p * p_max (p_max = .5)
        (0, 1.0, 0.05, {0, 1, 2, 3, 4}),  # threshold .025
        (0, 1.0, 0.25, {1, 3, 4}),  # threshold .125
        (0, 1.0, 0.35, {1, 3}),  # threshold .175
        (0, 1.0, 1.0, {1}),
        # top-p after top-k works on the renormalised survivors: .5/.85, .2/.85, .15/.85 =
        # .588, .235, .176 -> masses before: 0, .588, .824 -> p=.8 keeps two (alone it keeps 3)
        (3, 0.8, 0.0, {1, 3}),
        (0, 0.8, 0.0, {1, 3, 4}),
        # all three: top-4 leaves .526 .211 .158 .105, top-p .8 drops the last (.895
        # before it), min-p .35 needs >= .184
        (4, 0.8, 0.35, {1, 3}),
    ],
)
def test_filter_logits_keeps_exactly_the_hand_computed_tokens(top_k, top_p, min_p, expected):
    out = filter_logits(ROW.clone(), top_k, top_p, min_p)
    assert kept(out) == expected
    for i in expected:  # survivors keep their logit; filtering never rescales
        assert out[i].item() == ROW[i].item()


def test_filter_logits_does_not_modify_its_input():
    row = ROW.clone()
    filter_logits(row, 2, 0.5, 0.3)
    assert torch.equal(row, ROW)


def test_top_k_keeps_ties_with_the_kth_value():
    row = torch.tensor([1.0, 2.0, 2.0, 0.0])
    assert kept(filter_logits(row, 2, 1.0, 0.0)) == {1, 2}
    assert kept(filter_logits(row, 1, 1.0, 0.0)) == {1, 2}  # sample() treats top_k=1 as greedy


# ----- penalties ----------------------------------------------------------------------------------

BASE = [2.0, -1.0, 0.5, -3.0, 4.0, 0.0, 1.0, -0.5]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    seq = make_seq(SamplingParams(repetition_penalty=2.0), prompt=[0, 1, 5], output=[3, 0])
    out = apply_penalties(torch.tensor([BASE]), [seq])[0].tolist()
    # seen: 0 (prompt and output, penalised once), 1, 3, 5 (a zero logit stays zero)
    assert out == [1.0, -2.0, 0.5, -6.0, 4.0, 0.0, 1.0, -0.5]


def test_repetition_penalty_below_one_favours_seen_tokens():
    seq = make_seq(SamplingParams(repetition_penalty=0.5), prompt=[4], output=[1])
    out = apply_penalties(torch.tensor([BASE]), [seq])[0].tolist()
    assert out == [2.0, -0.5, 0.5, -3.0, 8.0, 0.0, 1.0, -0.5]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    params = SamplingParams(presence_penalty=0.25, frequency_penalty=0.5)
    seq = make_seq(params, prompt=[2, 2, 6], output=[3, 3, 5, 3])
    out = apply_penalties(torch.tensor([BASE]), [seq])[0].tolist()
    # token 3: 3 times -> 3 * .5 + .25 = 1.75; token 5: once -> .5 + .25 = .75
    assert out == [2.0, -1.0, 0.5, -4.75, 4.0, -0.75, 1.0, -0.5]


def test_negative_presence_and_frequency_penalties_raise_logits():
    params = SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5)
    seq = make_seq(params, output=[4, 4])
    out = apply_penalties(torch.tensor([BASE]), [seq])[0].tolist()
    assert out == [2.0, -1.0, 0.5, -3.0, 6.0, 0.0, 1.0, -0.5]  # 4 + 2 * .5 + 1


def test_presence_penalty_without_output_changes_nothing():
    seq = make_seq(SamplingParams(presence_penalty=2.0, frequency_penalty=2.0), prompt=[0, 4])
    assert apply_penalties(torch.tensor([BASE]), [seq])[0].tolist() == BASE


def test_all_penalties_combine_row_by_row():
    both = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    rows = torch.tensor([BASE, BASE])
    seqs = [make_seq(both, prompt=[4], output=[0, 0]), make_seq(SamplingParams())]
    out = apply_penalties(rows, seqs).tolist()
    # row 0: token 0: 2 / 2 - (2 * .5 + 1) = -1; token 4 (prompt only): 4 / 2 = 2
    assert out[0] == [-1.0, -1.0, 0.5, -3.0, 2.0, 0.0, 1.0, -0.5]
    assert out[1] == BASE


# ----- sample() ---------------------------------------------------------------------------------


def test_greedy_picks_the_argmax_after_penalties():
    logits = torch.tensor([[3.0, 2.0, 0.0, 1.0]])
    raw_lp = torch.log_softmax(logits[0], -1)
    ((tok, lp, entry),) = sample(logits.clone(), [make_seq(SamplingParams(temperature=0.0))])
    assert (tok, entry) == (0, None) and lp == pytest.approx(raw_lp[0].item())
    # a repetition penalty on the prompt token 0 makes token 1 the best one
    seq = make_seq(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0])
    ((tok, lp, _),) = sample(logits.clone(), [seq])
    assert tok == 1 and lp == pytest.approx(raw_lp[1].item())  # reported: raw distribution
    # top_k=1 is greedy at any temperature, needing no generator
    ((tok, _, _),) = sample(logits.clone(), [make_seq(SamplingParams(temperature=5.0, top_k=1))])
    assert tok == 0



@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 1e-6])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature):
    # logits / 1e-40 overflow float32 to inf, and softmax(inf - inf) is NaN: the row once
    # "sampled" token 0 (end of text) whatever its logits
    logits = torch.tensor([[3.0, 2.0, 0.0, 5.0]])
    seqs = [make_seq(SamplingParams(temperature=temperature), seed=s) for s in range(4)]
    assert [tok for tok, _, _ in sample(logits.repeat(4, 1), seqs)] == [3, 3, 3, 3]


@pytest.mark.parametrize("top_p", [1e-300, 1e-45])
def test_a_top_p_below_float32_keeps_the_best_token(top_p):
    # 1e-300 is a valid top_p in (0, 1] but rounds to 0.0 in float32
    assert kept(filter_logits(ROW.clone(), 0, top_p, 0.0)) == {1}
    logits = torch.tensor([[3.0, 2.0, 0.0, 5.0]])
    ((tok, _, _),) = sample(logits, [make_seq(SamplingParams(top_p=top_p), seed=1)])
    assert tok == 3

def test_sample_leaves_the_callers_logits_untouched():
    logits = torch.tensor([[3.0, 2.0, 0.0, 1.0]])
    seq = make_seq(
        SamplingParams(temperature=0.0, repetition_penalty=3.0, presence_penalty=2.0),
        prompt=[0],
        output=[0, 1],
    )
    sample(logits, [seq])
    assert logits.tolist() == [[3.0, 2.0, 0.0, 1.0]]


def draws(params: SamplingParams, logits: list[float], seed: int, n: int) -> list[int]:
    seq = make_seq(params, seed=seed)
    row = torch.tensor([logits])
    return [sample(row, [seq])[0][0] for _ in range(n)]


LOGITS = [1.0, 0.2, -0.5, 2.0, 0.0, 1.5]


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=0.8)
    a = draws(params, LOGITS, seed=7, n=300)
    assert a == draws(params, LOGITS, seed=7, n=300)
    assert a != draws(params, LOGITS, seed=8, n=300)


@pytest.mark.parametrize(
    "params,allowed",
    [
        (SamplingParams(temperature=1.0), {0, 1, 2, 3, 4, 5}),
        (SamplingParams(temperature=0.7, top_k=3), {0, 3, 5}),
        # tempered by 1.3 the best two have .363 + .247 = .61 >= .55
        (SamplingParams(temperature=1.3, top_p=0.55), {3, 5}),
        # p / p_max: token 5 e^-.5 = .61, token 0 e^-1 = .37, token 1 e^-1.8 = .17
        (SamplingParams(temperature=1.0, min_p=0.3), {0, 3, 5}),
        (SamplingParams(temperature=1.0, min_p=0.4), {3, 5}),
    ],
)
def test_sampling_draws_only_allowed_tokens_with_the_right_frequencies(params, allowed):
    # Independent expectation: softmax(logits / T) renormalised over the allowed tokens.
    scaled = [x / params.temperature for x in LOGITS]
    z = sum(math.exp(scaled[i]) for i in allowed)
    want = {i: math.exp(scaled[i]) / z for i in allowed}
    n = 3000
    got = draws(params, LOGITS, seed=1, n=n)
    assert set(got) == allowed  # every allowed token shows up, nothing else ever does
    for i in allowed:  # seeded, so deterministic; 0.03 is > 4 standard errors at n=3000
        assert abs(got.count(i) / n - want[i]) < 0.03


def test_logprob_entries_are_the_raw_log_softmax_with_top_n_best_first():
    vocab = [0.3, -1.2, 2.5, 0.9, 2.4, -0.1, 1.7, 0.0]
    logits = torch.tensor([vocab, vocab, vocab])
    ref = [v - math.log(sum(math.exp(x) for x in vocab)) for v in vocab]  # log-softmax by hand
    best = sorted(range(len(vocab)), key=lambda i: -ref[i])  # 2, 4, 6, 3, ...
    seqs = [
        # knobs that change the choice must not change the reported log-probs
        make_seq(
            SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=5.0), prompt=[2, 4]
        ),
        make_seq(SamplingParams(temperature=0.5, logprobs=0, top_k=2), seed=3),
        make_seq(SamplingParams(temperature=0.0)),
    ]
    results = sample(logits, seqs)

    tok, lp, entry = results[0]
    assert tok == 6  # 2 and 4 are penalised below 1.7
    assert isinstance(entry, TokenLogprob) and entry.token_id == 6
    assert lp == pytest.approx(ref[6], abs=1e-5) and entry.logprob == pytest.approx(
        ref[6], abs=1e-5
    )
    assert [t for t, _ in entry.top] == best[:3] == [2, 4, 6]
    assert [v for _, v in entry.top] == pytest.approx([ref[i] for i in best[:3]], abs=1e-5)

    tok, lp, entry = results[1]
    assert tok in (2, 4) and entry.token_id == tok and entry.top == []
    assert entry.logprob == pytest.approx(ref[tok], abs=1e-5) and lp == entry.logprob

    tok, lp, entry = results[2]
    assert tok == 2 and entry is None and lp == pytest.approx(ref[2], abs=1e-5)


# ----- constraints: logit_bias, allowed_token_ids, bad words, min_tokens --------------------------


def constrained(params: SamplingParams, output=(), bad_words_ids=(), pending=None) -> list[float]:
    seq = make_seq(params, output=output)
    seq.group.eos_token_ids = frozenset({1})
    seq.group.bad_words_ids = [list(w) for w in bad_words_ids]
    row = torch.tensor([BASE])
    out = apply_constraints(row, [seq], pending)
    assert row.tolist() == [BASE]  # the caller's logits are never modified
    return out[0].tolist()


def test_logit_bias_adds_to_the_named_tokens():
    out = constrained(SamplingParams(logit_bias={"4": -100, 3: 2.5, 0: 0.25}))
    assert out == [2.25, -1.0, 0.5, -0.5, -96.0, 0.0, 1.0, -0.5]


def test_allowed_token_ids_mask_every_other_token():
    out = constrained(SamplingParams(allowed_token_ids=[6, 2, 3]))
    assert out == [NEG_INF, NEG_INF, 0.5, -3.0, NEG_INF, NEG_INF, 1.0, NEG_INF]
    # with a bias on an allowed and a forbidden token
    out = constrained(SamplingParams(allowed_token_ids=[2, 3], logit_bias={3: 1.0, 4: 5.0}))
    assert out == [NEG_INF, NEG_INF, 0.5, -2.0, NEG_INF, NEG_INF, NEG_INF, NEG_INF]


def test_bad_words_ban_single_tokens_always_and_a_longer_words_end_after_its_start():
    words = [[5], [7, 4], [3, 6, 2]]
    params = SamplingParams(bad_words=["x"])  # the ids are the engine's work (tokenizer)
    banned = {i for i, v in enumerate(constrained(params, (), words)) if v == NEG_INF}
    assert banned == {5}
    assert {i for i, v in enumerate(constrained(params, (0, 7), words)) if v == NEG_INF} == {5, 4}
    assert {i for i, v in enumerate(constrained(params, (3, 6), words)) if v == NEG_INF} == {5, 2}
    assert {i for i, v in enumerate(constrained(params, (6, 3), words)) if v == NEG_INF} == {5}


def test_min_tokens_masks_eos_and_stop_ids_until_the_output_is_long_enough():
    params = SamplingParams(min_tokens=3, stop_token_ids=[6], max_tokens=8)
    masked = [2.0, NEG_INF, 0.5, -3.0, 4.0, 0.0, NEG_INF, -0.5]
    assert constrained(params, (4, 4)) == masked
    assert constrained(params, (4, 4, 4)) == BASE
    # a token sampled on the device but not yet appended counts (the engine's lookahead)
    assert constrained(params, (4, 4), pending=[1]) == BASE
    ignore = SamplingParams(min_tokens=3, stop_token_ids=[6], max_tokens=8, ignore_eos=True)
    assert constrained(ignore, (4,))[1] == -1.0  # EOS is no stop then: it stays


def test_sampling_respects_constraints_row_by_row():
    logits = torch.tensor([BASE, BASE, BASE, BASE])
    seqs = [
        make_seq(SamplingParams(temperature=0.0, logit_bias={3: 10.0})),
        make_seq(SamplingParams(temperature=0.0, allowed_token_ids=[0, 5])),
        make_seq(SamplingParams(temperature=1.0, allowed_token_ids=[2, 3]), seed=4),
        make_seq(SamplingParams(temperature=0.0)),
    ]
    picked = [tok for tok, _, _ in sample(logits, seqs)]
    assert picked[0] == 3 and picked[1] == 0 and picked[2] in (2, 3) and picked[3] == 4
    seq = make_seq(SamplingParams(temperature=3.0, allowed_token_ids=[2, 3]), seed=9)
    assert {sample(torch.tensor([BASE]), [seq])[0][0] for _ in range(200)} == {2, 3}


# ----- through the engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampler-llama")
    hf = make_model(path, "llama")
    return str(path), hf


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model[0], block_size=4, num_kv_blocks=512, max_num_batched_tokens=64)


def hf_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Log-softmax of HF's logits at each generated position: ``[len(output), vocab]``."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(output) - 1], -1)


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 256) for _ in range(rng.randint(2, 12))] for _ in range(n)]


SEEDED = SamplingParams(n=4, seed=1234, temperature=1.0, max_tokens=10)


def token_ids(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def test_seeded_n_sampling_is_reproducible_and_independent_of_the_batch(llm, model):
    prompt = [0, 40, 41, 42, 43, 44, 45, 46, 47, 48]
    alone = llm.generate([prompt], SEEDED)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2, 3]
    samples = token_ids(alone)
    assert len({tuple(s) for s in samples}) == 4  # four different samples
    assert token_ids(llm.generate([prompt], SEEDED)[0]) == samples  # again: identical

    # In a batch with other requests (sampled, greedy, longer prompts), it is still the same.
    others = random_prompts(4, seed=5)
    batch = others[:2] + [prompt] + others[2:]
    params = [
        SamplingParams(n=3, temperature=1.2, seed=99, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=6),
        SEEDED,
        SamplingParams(temperature=0.9, top_p=0.8, max_tokens=14),
        SamplingParams(n=2, temperature=0.5, max_tokens=3),
    ]
    outs = llm.generate(batch, params)
    assert token_ids(outs[2]) == samples
    # and the sampled tokens are the model's: their reported log-probs agree with HF
    _, hf = model
    for c in outs[2].outputs:
        ref = hf_logprobs(hf, prompt, c.token_ids)
        want = sum(ref[j, t].item() for j, t in enumerate(c.token_ids))
        assert c.cumulative_logprob == pytest.approx(want, abs=1e-3)

    # A different seed gives different samples.
    other_seed = SamplingParams(n=4, seed=4321, temperature=1.0, max_tokens=10)
    assert token_ids(llm.generate([prompt], other_seed)[0]) != samples


TEXT_PROMPT = "The weather today"


@pytest.fixture(scope="module")
def greedy_reference(llm, model):
    """HF's greedy tokens and text for a text prompt, straight through EOS: the tests below
    pass ignore_eos, so only the condition under test can end a run before 24 tokens."""
    _, hf = model
    ids = llm.tokenizer(TEXT_PROMPT).input_ids
    want = hf_greedy_no_eos(hf, ids, 24)
    text = llm.tokenizer.decode(want, skip_special_tokens=True)
    return want, text


def first_ascii_pair(text: str) -> tuple[str, int]:
    for i in range(1, len(text) - 1):
        s = text[i : i + 2]
        if all(c.isascii() and c.isprintable() for c in s) and text.find(s) == i:
            return s, i
    raise AssertionError(f"no printable pair in {text!r}")


def tokens_to_reach(tokenizer, ids: list[int], s: str) -> int:
    """The fewest leading tokens whose text contains ``s``."""
    for k in range(1, len(ids) + 1):
        if s in tokenizer.decode(ids[:k], skip_special_tokens=True):
            return k
    raise AssertionError(s)


def test_unconstrained_greedy_run_matches_the_reference(llm, greedy_reference):
    want, text = greedy_reference
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    out = llm.generate(TEXT_PROMPT, params)[0].outputs[0]
    assert out.token_ids == want and out.text == text and out.finish_reason == "length"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates_the_text(llm, greedy_reference, include):
    want, text = greedy_reference
    stop, pos = first_ascii_pair(text)
    k = tokens_to_reach(llm.tokenizer, want, stop)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=24,
        ignore_eos=True,
        stop=["never-in-this-text", stop],
        include_stop_str_in_output=include,
    )
    out = llm.generate(TEXT_PROMPT, params)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == (text[: pos + len(stop)] if include else text[:pos])
    assert out.token_ids == want[:k]  # generation ends at the token completing the stop string


def test_stop_string_that_never_appears_runs_to_length(llm, greedy_reference):
    want, text = greedy_reference
    params = SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop=["never-in-this-text"]
    )
    out = llm.generate(TEXT_PROMPT, params)[0].outputs[0]
    assert (out.token_ids, out.text, out.finish_reason) == (want, text, "length")


def test_stop_token_ids_stop_generation(llm, greedy_reference):
    want, _ = greedy_reference
    j = next(j for j in range(3, len(want)) if want[j] not in want[:j])
    params = SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[want[j]]
    )
    out = llm.generate(TEXT_PROMPT, params)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == want[: j + 1]  # the stop token is the last one returned


def test_ignore_eos_runs_to_max_tokens(llm, model):
    _, hf = model
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    candidates = random_prompts(48, seed=11)
    outs = llm.generate(candidates, greedy)
    # a prompt whose greedy continuation hits EOS (id 1) early
    early = [
        (p, o.outputs[0])
        for p, o in zip(candidates, outs, strict=True)
        if o.outputs[0].finish_reason == "stop" and len(o.outputs[0].token_ids) < 12
    ]
    assert early, "no candidate prompt reaches EOS early on this model"
    prompt, out = early[0]
    reference = hf_greedy_no_eos(hf, prompt, 16)
    eos_at = reference.index(1)
    assert out.token_ids == reference[: eos_at + 1]  # stopped at EOS, EOS included

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    full = llm.generate([prompt], params)[0].outputs[0]
    assert full.finish_reason == "length"
    assert full.token_ids == reference  # the greedy path runs on through EOS


def test_logprobs_return_top_entries_for_every_token(llm, model):
    _, hf = model
    prompt = random_prompts(1, seed=21)[0]
    for params in (
        SamplingParams(temperature=0.0, max_tokens=8, logprobs=3),
        SamplingParams(temperature=1.0, seed=5, max_tokens=8, logprobs=3, top_k=20),
    ):
        out = llm.generate([prompt], params)[0].outputs[0]
        assert len(out.logprobs) == len(out.token_ids) == 8
        ref = hf_logprobs(hf, prompt, out.token_ids)
        for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            assert entry.token_id == tok
            assert entry.logprob == pytest.approx(ref[j, tok].item(), abs=1e-4)
            assert len(entry.top) == 3
            vals, ids = torch.topk(ref[j], 3)
            assert [t for t, _ in entry.top] == ids.tolist()
            assert [v for _, v in entry.top] == pytest.approx(vals.tolist(), abs=1e-4)
            assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
        assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))
    # without logprobs nothing is returned
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
    assert out.logprobs is None
