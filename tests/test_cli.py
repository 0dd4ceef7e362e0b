"""The ``segserve`` command line, run in-process through ``main(argv)``.

The demo model is built once per module into a temporary ``SEGSERVE_CACHE_DIR``, so the tests
never touch the user's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from segserve.deploy.cli import main


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("segserve-cache")))
        yield


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before this call
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# A small fixed KV pool: the default 2 GiB pool takes seconds to allocate and changes nothing here.
SMALL_POOL = ["--num-kv-blocks", "64"]


def test_generate_json_matches_llm(capsys):
    from segserve import LLM, SamplingParams

    rc, out, err = run(
        capsys,
        [
            "generate",
            "--model",
            "demo",
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ],
    )
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert set(got) >= {"token_ids", "text", "finish_reason"}
    expected = (
        LLM("demo", num_kv_blocks=64)
        .generate("hi", SamplingParams(max_tokens=4, temperature=0.0))[0]
        .outputs[0]
    )
    assert got["token_ids"] == expected.token_ids
    assert got["text"] == expected.text
    assert got["finish_reason"] == expected.finish_reason


def test_bad_sampling_value_exits_2_naming_it(capsys):
    rc, out, err = run(
        capsys, ["generate", "--model", "demo", "--prompt", "hi", "--temperature", "-1"]
    )
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert any(line.startswith("error:") and "temperature" in line for line in lines), err
    assert "Traceback" not in err


def test_missing_model_dir_exits_2(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    rc, out, err = run(capsys, ["generate", "--model", str(missing), "--prompt", "hi"])
    assert rc == 2
    assert err.startswith("error:") and str(missing) in err
    assert "Traceback" not in err


def test_prompt_outside_vocab_exits_2(capsys):
    rc, _, err = run(
        capsys, ["generate", "--model", "demo", *SMALL_POOL, "--prompt-ids", "0,99999"]
    )
    assert rc == 2 and err.startswith("error:") and "99999" in err


def test_stream_prints_the_same_text(capsys):
    argv = [
        "generate",
        "--model",
        "demo",
        *SMALL_POOL,
        "--prompt",
        "hi",
        "--prompt",
        "The weather",
        "--max-tokens",
        "12",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--n",
        "2",
    ]
    rc, plain, err = run(capsys, argv)
    assert rc == 0, err
    rc, streamed, err = run(capsys, [*argv, "--stream"])
    assert rc == 0, err
    assert streamed == plain
    assert plain.count("=== prompt") == 4  # 2 prompts x 2 samples, in order


def test_stream_json_deltas_add_up_to_the_unstreamed_outputs(capsys):
    argv = ["generate", "--model", "demo", *SMALL_POOL, "--prompt", "hi", "--prompt-ids",
            "5,6,7", "--max-tokens", "5", "--temperature", "0", "--logprobs", "1", "--json"]
    rc, plain, err = run(capsys, argv)
    assert rc == 0, err
    rc, streamed, err = run(capsys, [*argv, "--stream"])
    assert rc == 0, err
    whole = [json.loads(line) for line in plain.splitlines()]
    deltas = [json.loads(line) for line in streamed.splitlines()]
    for request in whole:
        mine = [d for d in deltas if d["prompt_index"] == request["prompt_index"]]
        assert [t for d in mine for t in d["token_ids"]] == request["token_ids"]
        assert "".join(d["text"] for d in mine) == request["text"]
        assert [e for d in mine for e in d["logprobs"]] == request["outputs"][0]["logprobs"]
        assert mine[-1]["finish_reason"] == request["finish_reason"] == "length"


def test_stream_single_prompt_is_bare_text(capsys):
    argv = [
        "generate",
        "--model",
        "demo",
        *SMALL_POOL,
        "--prompt",
        "hi",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    ]
    _, plain, _ = run(capsys, argv)
    _, streamed, _ = run(capsys, [*argv, "--stream"])
    assert streamed == plain and "===" not in plain


def test_bench_offline_prints_one_row_per_batch_size(capsys):
    rc, out, err = run(
        capsys,
        [
            "bench-offline",
            "--model",
            "demo",
            "--batch-sizes",
            "1,2",
            "--input-len",
            "8",
            "--output-len",
            "4",
        ],
    )
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    for r in rows:
        assert len(r) == 5  # batch, prefill ms, decode p50, decode p99, tok/s
        assert all(float(x) > 0 for x in r[1:])


def test_module_runs_without_importing_ray():
    # `python -m segserve.deploy.cli` works, and the module itself pulls in neither Ray nor torch
    # (the engine is imported by the subcommand that needs it).
    code = (
        "import sys, segserve.deploy.cli; "
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run(
        [sys.executable, "-m", "segserve.deploy.cli", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "generate" in out and "bench-offline" in out


def test_serve_mode_is_checked_and_sets_rays_environment(monkeypatch):
    """`segserve serve --serve-mode` names one of launch.SERVE_MODES; the mode's variables go
    into the environment that the Ray it starts inherits (Ray reads them once per process)."""
    from segserve.deploy import launch
    from segserve.deploy.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--serve-mode", "fast"])
    assert build_parser().parse_args(["serve"]).serve_mode == launch.DEFAULT_SERVE_MODE
    for name in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED",
                 "RAY_SERVE_ENABLE_HA_PROXY"):  # fmt: skip
        monkeypatch.setenv(name, "1")  # a stale value from the shell must not leak through
    launch.set_serve_mode("throughput")
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    launch.set_serve_mode("serve-defaults")
    assert all(os.environ[k] == "0" for k in launch.SERVE_MODES["haproxy"]
               if k != "RAY_SERVE_LOG_TO_STDERR")  # fmt: skip
    # The default: Serve's throughput settings behind its proxy, whose ports stay put. Direct
    # ingress must be named off: THROUGHPUT_OPTIMIZED turns it on by default.
    launch.set_serve_mode("proxy")
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert os.environ["RAY_SERVE_LOG_TO_STDERR"] == "1"
    with pytest.raises(ValueError, match="serve mode"):
        launch.set_serve_mode("fast")
