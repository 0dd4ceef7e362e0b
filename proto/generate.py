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

# protoc writes a top-level import, which only resolves when the stubs' folder is on sys.path.
# Ray Serve's gRPC proxy imports `segserve.proto.segserve_pb2_grpc` in its own process, so the
# import must be package-relative.
_GRPC_IMPORT = b"import segserve_pb2 as segserve__pb2\n"
_GRPC_IMPORT_RELATIVE = b"from . import segserve_pb2 as segserve__pb2\n"


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile ``proto_dir/segserve.proto`` into ``out_dir``; returns the files written."""
    from grpc_tools import protoc  # a build-time tool only: imported here, not at module level

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = resources.files("grpc_tools") / "_proto"  # well-known types (google/protobuf/...)
    # protoc writes into a scratch folder first, so a failed run leaves the old stubs intact.
    with tempfile.TemporaryDirectory() as tmp:
        # The .proto is named by its path relative to -I: the descriptor embedded in _pb2 then
        # says "segserve.proto", never this machine's absolute path.
        rc = protoc.main([
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto_dir / PROTO_FILE),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto_dir / PROTO_FILE} (exit {rc}); "
                               "its messages are above")
        written = []
        for name in OUTPUTS:
            data = (Path(tmp) / name).read_bytes()
            if name == "segserve_pb2_grpc.py":
                if data.count(_GRPC_IMPORT) != 1:
                    # A grpcio-tools release changed the import line: fail rather than commit
                    # stubs that only import with the proto folder on sys.path.
                    raise RuntimeError(f"expected one {_GRPC_IMPORT!r} in the generated {name}")
                data = data.replace(_GRPC_IMPORT, _GRPC_IMPORT_RELATIVE)
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
