"""Regenerate the Python stubs of ``segserve.proto``.

    python -m segserve.proto.generate

writes ``segserve_pb2.py``, ``segserve_pb2.pyi`` and ``segserve_pb2_grpc.py`` next to the .proto.
They are committed, so neither users nor Ray Serve's gRPC proxy need grpcio-tools;
tests/test_proto.py regenerates into a temporary folder and fails while the committed ones are
stale. The output depends only on the .proto and the grpcio-tools version (no timestamps or
absolute paths), so regenerating with the same version changes nothing.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "segserve.proto"
OUTPUTS = ("segserve_pb2.py", "segserve_pb2.pyi", "segserve_pb2_grpc.py")

# protoc names the generated module after the .proto's path under -I. Compiling it as
# segserve/proto/segserve.proto makes the messages' __module__ `segserve.proto.segserve_pb2`:
# Ray Serve pickles request messages between its gRPC proxy and the ingress, and unpickling
# imports that module by name, so a bare `segserve_pb2` would fail outside this folder.
_PACKAGE_PATH = Path("segserve") / "proto"
_GRPC_IMPORT = b"from segserve.proto import segserve_pb2 as segserve_dot_proto_dot_segserve__pb2\n"


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile ``proto_dir/segserve.proto`` into ``out_dir``; returns the files written."""
    from grpc_tools import protoc  # a build-time tool only: imported here, not at module level

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = resources.files("grpc_tools") / "_proto"  # well-known types (google/protobuf/...)
    # protoc writes into a scratch folder first, so a failed run leaves the old stubs intact.
    with tempfile.TemporaryDirectory() as tmp:
        # The .proto is named by its path relative to -I: the descriptor embedded in _pb2 then
        # says "segserve/proto/segserve.proto", never this machine's absolute path.
        src = Path(tmp) / "src"
        (src / _PACKAGE_PATH).mkdir(parents=True)
        (src / _PACKAGE_PATH / PROTO_FILE).write_bytes((proto_dir / PROTO_FILE).read_bytes())
        rc = protoc.main([
            "grpc_tools.protoc",
            f"--proto_path={src}",
            f"--proto_path={include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(_PACKAGE_PATH / PROTO_FILE),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto_dir / PROTO_FILE} (exit {rc}); "
                               "its messages are above")
        written = []
        for name in OUTPUTS:
            data = (Path(tmp) / _PACKAGE_PATH / name).read_bytes()
            if name == "segserve_pb2_grpc.py" and data.count(_GRPC_IMPORT) != 1:
                # A grpcio-tools release changed how it imports: fail rather than commit stubs
                # that only import with the proto folder on sys.path.
                raise RuntimeError(f"expected one {_GRPC_IMPORT!r} in the generated {name}")
            path = out_dir / name
            path.write_bytes(data)
            written.append(path)
    return written


def main() -> int:
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
