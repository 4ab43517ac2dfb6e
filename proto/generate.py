"""Generate the Python stubs of proto/kvcache.proto into a folder (`make proto` writes kvcache/wire/)."""

import pathlib
import re
import sys

from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parent


def generate(out_dir: pathlib.Path) -> None:
    """Run protoc on proto/kvcache.proto and make the grpc stub import its sibling inside the package."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", "kvcache.proto"]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = out_dir / "kvcache_pb2_grpc.py"
    text = re.sub(r"^import kvcache_pb2 as", "from kvcache.wire import kvcache_pb2 as", grpc_file.read_text(),
                  flags=re.M)
    grpc_file.write_text(text)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR.parent / "kvcache" / "wire")
