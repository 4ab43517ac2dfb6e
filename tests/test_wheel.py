"""The wheel installs one top-level package, kvcache: the repo's kernels/, engine/ and bench/ go under it."""

import shutil
import subprocess
import sys
import zipfile

import pytest
from service_support import REPO_ROOT


@pytest.mark.slow
def test_the_wheel_holds_only_the_kvcache_namespace_with_its_data(tmp_path):
    # Built from a copy: a build/ folder left in the checkout by an earlier build could add stale modules.
    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info",
                                                                     "__pycache__", "results", ".whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("kvcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"kvcache", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("kvcache/kernels/paged_decode.py", "kvcache/engine/model.py", "kvcache/bench/decode.py",
                   "kvcache/methods/window.py", "kvcache/engine/patterns/smollm2-135m.json",
                   "kvcache/methods/gates/smollm2-135m.safetensors", "kvcache/methods/allocations/smollm2-135m.json",
                   "kvcache/integrations/hf/cache.py",
                   "kvcache/service/local_plane.py", "kvcache/wire/frames.py"):
        assert module in names, module
