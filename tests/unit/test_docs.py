"""The documentation stays true to the code: the chart's values table, every config key, links and tables.

Fast and offline: no torch, no network. README.md is the front door (short); the reference lives in docs/*.md
and charts/train/README.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from trainer.config import Config

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
CHART_README = REPO / "charts" / "train" / "README.md"
PAGES = [README, *DOCS, CHART_README]
SCRIPT = REPO / "scripts" / "chart_values_table.py"
README_MAX_LINES = 220

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def chart_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_values_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def without_code_spans(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


# --------------------------------------------------------------------------------------------- chart values
def test_chart_values_table_is_in_sync() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_chart_value_is_documented() -> None:
    script = chart_script()
    text = script.VALUES.read_text(encoding="utf-8")
    missing = script.undocumented(yaml.safe_load(text), script.documented_keys(text))
    assert not missing, f"charts/train/values.yaml: keys without a '# --' comment: {', '.join(missing)}"


def test_the_values_table_parser_follows_the_helm_docs_convention() -> None:
    script = chart_script()
    text = ("# a plain comment is not documentation\nplain: 1\n"
            "# -- the first line\n# and its continuation\nnested:\n  # -- a leaf\n  leaf: x\n  other: |\n"
            "    key: inside a block scalar\n\n# -- not followed by a key\n\nfree:\n  # ignored above '# --'\n"
            "  # -- a map as a whole\n  map: {a: 1}\n")
    docs = script.documented_keys(text)
    assert docs == {"nested": "the first line and its continuation", "nested.leaf": "a leaf",
                    "free.map": "a map as a whole"}
    assert script.undocumented(yaml.safe_load(text), docs) == ["plain"]
    assert script.cell("a <b> `<c>` | d") == "a &lt;b&gt; `<c>` \\| d"


# ------------------------------------------------------------------------------------------- config keys
def config_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted names of every leaf of the config: ``section.key``, ``data.train.coco``, ``data.tiles.size``..."""
    keys = []
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        name = f"{prefix}{field.name}"
        keys.extend(config_keys(value, f"{name}.") if dataclasses.is_dataclass(value) else [name])
    return keys


def test_every_config_key_is_in_the_configuration_reference() -> None:
    keys = config_keys(Config())
    assert len(keys) > 50 and "data.train.coco" in keys and "data.tiles.min_visibility" in keys
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [key for key in keys if not re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", page)]
    assert not missing, f"docs/configuration.md does not mention: {', '.join(missing)}"


# ------------------------------------------------------------------------------------------------- links
def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces → '-', repeats -1...)."""
    anchors: set[str] = set()
    for _, line in prose_lines(text):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match[1].lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_that_exist(page: Path) -> None:
    broken = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(without_code_spans(line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked (no network)
                continue
            path_part, _, anchor = target.partition("#")
            destination = (page.parent / path_part).resolve() if path_part else page
            if not destination.exists():
                broken.append(f"line {number}: {target} (no such file)")
            elif anchor and destination.suffix == ".md" and anchor not in github_anchors(
                    destination.read_text(encoding="utf-8")):
                broken.append(f"line {number}: {target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: broken links: " + "; ".join(broken)


# ------------------------------------------------------------------------------------------ shape, tables
def test_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"
    for page in DOCS:
        assert f"(docs/{page.name}" in README.read_text(encoding="utf-8"), f"README.md does not link {page.name}"
        first = page.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# "), f"{page.name}: the first line is not a title"


def cells(row: str) -> int:
    """Cells of a table row as GitHub counts them: split on '|' not escaped by a backslash (in code spans too)."""
    body = row.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return len(re.split(r"(?<!\\)\|", body))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_table_has_the_same_number_of_cells_in_each_row(page: Path) -> None:
    problems = []
    lines = prose_lines(page.read_text(encoding="utf-8"))
    tables: list[list[tuple[int, str]]] = []
    previous: tuple[int, str] | None = None
    for number, line in lines:
        if line.lstrip().startswith("|"):
            consecutive = previous is not None and previous[0] == number - 1 and previous[1].lstrip().startswith("|")
            if consecutive:
                tables[-1].append((number, line))
            else:
                if previous is not None and previous[0] == number - 1 and previous[1].strip():
                    problems.append(f"line {number}: a table needs a blank line before it")
                tables.append([(number, line)])
        previous = (number, line)
    for table in tables:
        header = cells(table[0][1])
        if len(table) < 2 or not re.fullmatch(r"\|?(\s*:?-{3,}:?\s*\|)*\s*:?-{3,}:?\s*\|?", table[1][1].strip()):
            problems.append(f"line {table[0][0]}: a table row without a '| --- |' delimiter row below it")
            continue
        for number, row in table:
            if not row.rstrip().endswith("|") or row.rstrip().endswith("\\|"):
                problems.append(f"line {number}: the row does not end with '|'")
            if cells(row) != header:
                problems.append(f"line {number}: {cells(row)} cells, the header has {header}")
    assert not problems, f"{page.relative_to(REPO)}: " + "; ".join(problems)
