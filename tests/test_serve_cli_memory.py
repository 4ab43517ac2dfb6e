"""`kvcache serve --memory SIZE`: size parsing, pages from bytes, the default pool, the allocation log lines."""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import pytest

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter
from kvcache.service.serve_cli import (
    DEFAULT_MEMORY,
    STORE_DEFAULTS,
    add_arguments,
    pages_for_memory,
    parse_size,
    preallocation_line,
    resolve,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ("--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--page-size", "4")  # 2 * (3*2*4*16*4 + 2*3*16*4)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _resolve(*flags: str) -> KVCacheConfig:
    return resolve(_parser().parse_args(list(flags)))[0]


@pytest.mark.parametrize(("text", "size"), [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1073741824", 2**30), ("1.5GiB", 3 * 2**29),
    ("64 kib", 64 * 1024), ("10KB", 10_000), ("7b", 7), ("1TiB", 2**40), (" 3 MB ", 3 * 10**6), (4096, 4096),
])
def test_sizes_parse_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "4 gigs", "4G", "-1", "1e9", "4GiB5", "0x10", "four", True, 1.5, None])
def test_malformed_sizes_are_rejected_by_name(text):
    with pytest.raises(InvalidParameter, match="--memory") as info:
        parse_size(text)
    assert "4GiB" in str(info.value)  # says what a size looks like


@pytest.mark.parametrize("text", ["0", "0GiB", "0.1"])
def test_sizes_below_one_byte_are_rejected(text):
    with pytest.raises(InvalidParameter, match="at least one byte"):
        parse_size(text)


def test_memory_gives_whole_pages_of_the_configs_page_bytes():
    config = _resolve(*SMALL, "--memory", "1MiB")
    assert config.device_pages == 2**20 // config.page_bytes
    assert config.device_pages * config.page_bytes <= 2**20 < (config.device_pages + 1) * config.page_bytes


def test_pages_follow_the_dtype():
    wide = _resolve("--memory", "2GiB", "--dtype", "float32")
    narrow = _resolve("--memory", "2GiB", "--dtype", "bfloat16")
    assert (wide.device_pages, narrow.device_pages) == (2**31 // wide.page_bytes, 2**31 // narrow.page_bytes)
    assert narrow.device_pages > wide.device_pages


def test_memory_below_one_page_is_an_error_naming_the_page_size():
    one_page = _resolve(*SMALL, "--pages", "1").page_bytes
    assert _resolve(*SMALL, "--memory", str(one_page)).device_pages == 1
    with pytest.raises(InvalidParameter, match="less than one page") as info:
        _resolve(*SMALL, "--memory", str(one_page - 1))
    assert f"{one_page:,} bytes" in str(info.value)


def test_pages_for_memory_ignores_the_configs_own_page_count():
    config = KVCacheConfig(2, 2, 16, page_size=4, dtype="float32", device_pages=7)
    assert pages_for_memory(config, 10 * config.page_bytes + 1) == 10


def test_the_default_pool_is_the_default_memory_not_gigabytes_more():
    config = _resolve()
    assert config.device_pages == parse_size(DEFAULT_MEMORY) // config.page_bytes
    assert config.device_pages * config.page_bytes <= 2**30
    assert (config.num_layers, config.num_kv_heads, config.head_dim) == (
        STORE_DEFAULTS["num_layers"], STORE_DEFAULTS["num_kv_heads"], STORE_DEFAULTS["head_dim"])
    assert f"default {DEFAULT_MEMORY}" in _parser().format_help().replace("\n", " ").replace("  ", " ")


def test_pages_still_size_the_pool():
    assert _resolve(*SMALL, "--pages", "12").device_pages == 12


def test_pages_and_memory_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["--pages", "8", "--memory", "1GiB"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_toml_memory_sizes_the_pool_and_flags_win(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('[store]\nnum_layers = 2\nnum_kv_heads = 2\nhead_dim = 16\npage_size = 4\nmemory = "64KiB"\n')
    from_toml = _resolve("--config", str(config))
    assert from_toml.device_pages == 64 * 1024 // from_toml.page_bytes
    assert _resolve("--config", str(config), "--pages", "3").device_pages == 3
    assert _resolve("--config", str(config), "--memory", "128KiB").device_pages == 128 * 1024 // from_toml.page_bytes
    pages = tmp_path / "pages.toml"
    pages.write_text("[store]\nnum_layers = 2\nnum_kv_heads = 2\nhead_dim = 16\npage_size = 4\ndevice_pages = 5\n")
    assert _resolve("--config", str(pages)).device_pages == 5
    assert _resolve("--config", str(pages), "--memory", "64KiB").device_pages == from_toml.device_pages


def test_toml_with_both_pages_and_memory_is_rejected(tmp_path):
    config = tmp_path / "both.toml"
    config.write_text('[store]\ndevice_pages = 5\nmemory = "1GiB"\n')
    with pytest.raises(InvalidParameter, match="both device_pages and memory"):
        _resolve("--config", str(config))


def test_preallocation_line_says_pages_bytes_and_device():
    config = _resolve(*SMALL, "--pages", "10")
    line = preallocation_line(config)
    assert "\n" not in line
    assert "allocating 10 pages" in line
    assert f"{config.page_bytes:,} bytes" in line
    assert line.endswith("on cpu")


def test_preallocation_line_names_the_lower_tiers():
    line = preallocation_line(_resolve(*SMALL, "--pages", "10", "--host-pages", "6"))
    assert "6 pages in pinned host memory" in line


# `kvcache serve` through serve_cli itself (what kvcache.cli runs for `serve`).
SERVE = """
import argparse, sys
from kvcache.service.serve_cli import add_arguments, main
parser = argparse.ArgumentParser()
add_arguments(parser)
sys.exit(main(parser.parse_args(sys.argv[1:])))
"""


def test_serve_logs_the_allocation_on_stderr_before_and_after(tmp_path):
    stderr_path, stdout_path = tmp_path / "stderr", tmp_path / "stdout"
    with open(stderr_path, "w") as err, open(stdout_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, "--port", "0", *SMALL, "--memory", "256KiB"],
                                stdout=out, stderr=err, cwd=REPO_ROOT, text=True)
    try:
        deadline = time.monotonic() + 120
        while '"listening"' not in stdout_path.read_text():
            assert proc.poll() is None, f"serve exited:\n{stderr_path.read_text()}"
            assert time.monotonic() < deadline, "serve did not start listening"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = [line for line in stderr_path.read_text().splitlines() if line.startswith("kvcache serve:")]
    config = _resolve(*SMALL, "--memory", "256KiB")
    assert lines[0] == preallocation_line(config)
    assert lines[1].startswith("kvcache serve: allocated ") and " on cpu in " in lines[1]
    events = [json.loads(line) for line in stdout_path.read_text().splitlines()]
    assert events[0]["event"] == "listening"  # stdout stays JSON lines only


@pytest.mark.parametrize(("flags", "message"), [
    (("--memory", "lots"), "--memory 'lots': expected a size"),
    (("--memory", "100"), "less than one page"),
    (("--share-pool", "--host-pages", "8"), "--share-pool needs an untiered store"),
    (("--share-pool", "--step-lease-seconds", "0"), "--step-lease-seconds 0.0: expected a positive number"),
])
def test_serve_exits_2_with_the_reason(flags, message):
    proc = subprocess.run([sys.executable, "-c", SERVE, "--port", "0", *SMALL, *flags], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "allocating" not in proc.stderr  # refused before any allocation
