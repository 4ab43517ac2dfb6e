"""The headline table of docs/methods.md is what bench/readme_table.py renders from the committed results files."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from kvcache.bench import readme_table
from kvcache.bench.readme_table import END, START, main, render, replace_block

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLE_FILE = REPO_ROOT / "docs" / "methods.md"


def _block(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n")


def test_the_docs_block_equals_the_rendered_table():
    assert _block(TABLE_FILE.read_text()) == render().strip("\n"), (
        "docs/methods.md's headline table is stale: run python -m kvcache.bench.readme_table")


def test_check_passes_on_the_committed_docs():
    assert main(["--check"]) == 0


def test_every_figure_names_a_results_file_that_exists():
    for row in readme_table.headlines():
        if row.source is not None:
            assert (readme_table.RESULTS / row.source).is_file(), row.source


def test_the_table_follows_the_results(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(readme_table.RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.log"))
    report = json.loads((results / readme_table.HEADLINE_FILE).read_text())
    for row in report["decode"]["rows"]:
        if row["method"] == "dense" and row["context"] == readme_table.HEADLINE_CONTEXT and row["batch"] == 1:
            row["speedup_vs_sdpa"] = 0.5
    (results / readme_table.HEADLINE_FILE).write_text(json.dumps(report))
    assert "0.50x SDPA's speed" in render(results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\nold\n{END}\n\nrest\n")
    assert main(["--check", "--file", str(readme), "--results", str(results)]) == 1
    assert main(["--file", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# x\n\n{START}\n| method |") and text.endswith(f"{END}\n\nrest\n")
    assert "0.50x SDPA's speed" in _block(text)
    assert main(["--check", "--file", str(readme), "--results", str(results)]) == 0


def test_a_readme_without_the_markers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="methods-table"):
        replace_block("# no block here\n", "| a |\n")
    readme = tmp_path / "README.md"
    readme.write_text("# no block here\n")
    assert main(["--check", "--file", str(readme)]) == 2
