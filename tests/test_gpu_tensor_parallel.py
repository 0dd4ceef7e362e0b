"""Tensor parallelism over NCCL on two GPUs: TP=2 equals TP=1 in float32 (greedy, seeded
sampling, beams, log-probs within 1e-5), with CUDA graphs on (the all-reduces are captured in
the decode graphs). The GPU machine has no Ray, so the ranks start as local processes running
the same worker loop (``tp_launcher="processes"``). Skips without two CUDA GPUs."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, make_model
from segserve import LLM, SamplingParams
from tp_helpers import PROMPTS, assert_logprobs_close, tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-gpu")
    return str(path), make_model(path, "llama", vocab_size=251, attention_bias=True,
                                 mlp_bias=True)


@two_gpus
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_nccl_tp2_equals_tp1(model, graphs):
    _check_tp2_equals_tp1(model, "nccl", graphs)


def test_gloo_tp2_sharing_one_gpu_equals_tp1(model):
    """The sharded CUDA code (Triton kernels on shards, the vocabulary-parallel sampler on
    device tensors, the control path) where there is one GPU: both ranks on it, over gloo."""
    _check_tp2_equals_tp1(model, "gloo", graphs=True)  # gloo turns the graphs off itself


def _check_tp2_equals_tp1(model, communicator: str, graphs: bool) -> None:
    path, hf = model
    kw = dict(device="cuda", dtype="float32", kernel_backend="triton", num_kv_blocks=256,
              max_num_seqs=8, max_num_batched_tokens=256, cuda_graphs=graphs)
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=7, n=2,
                       logprobs=2),
    ]
    beam = SamplingParams(max_tokens=8, beam_width=3, temperature=0.0)
    one = LLM(path, **kw)
    a = one.generate(PROMPTS, params)
    a_beam = one.generate(PROMPTS[1], beam)
    del one
    torch.cuda.empty_cache()
    with LLM(path, tensor_parallel_size=2, tp_launcher="processes", communicator=communicator,
             **kw) as two:
        assert two.engine.runner.comm.name == communicator
        assert bool(two.engine.runner.decode.graphs) == (graphs and communicator == "nccl")
        b = two.generate(PROMPTS, params)
        b_beam = two.generate(PROMPTS[1], beam)
    assert tokens(a) == tokens(b)
    assert_logprobs_close(a, b)
    assert tokens(a_beam) == tokens(b_beam)
    assert b[0].outputs[0].token_ids == hf_greedy(hf.to("cuda"), PROMPTS[0], 12)
