#!/usr/bin/env python3
"""The values table of charts/train/README.md, generated from the comments in charts/train/values.yaml.

The convention is helm-docs': a comment line ``# -- description`` directly above a key documents it (its dotted
path, e.g. ``s3.bucket``); the comment lines that follow it, up to the key, continue the description. A comment
on a map documents the whole map (for maps whose keys are free-form, such as ``config`` or ``resources``).
Comment lines above the ``# --`` line and comments not followed directly by a key are ignored.

    scripts/chart_values_table.py            # print the table
    scripts/chart_values_table.py --check    # exit 1 when the README's table is out of date or a key is undocumented
    scripts/chart_values_table.py --write    # rewrite the table between the markers in the README

The table sits between ``<!-- values-table:start -->`` and ``<!-- values-table:end -->``. Only the standard
library and PyYAML (a dependency of the package) are used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
VALUES = REPO / "charts" / "train" / "values.yaml"
README = REPO / "charts" / "train" / "README.md"
START = "<!-- values-table:start -->"
END = "<!-- values-table:end -->"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.\-/]*|\"[^\"]*\"|'[^']*'):(?:\s|$)")
_DOC = re.compile(r"^ *# -- ?(?P<text>.*)$")
_COMMENT = re.compile(r"^ *#(?P<text>.*)$")
_BLOCK_SCALAR = re.compile(r":\s*[|>][0-9+-]*\s*(?:#.*)?$")  # `key: |` : the lines below are text, not keys


@dataclass
class Row:
    key: str  # dotted path
    type: str
    default: str
    description: str


class ValuesError(Exception):
    """values.yaml cannot be read as the convention expects (the message says where)."""


def documented_keys(text: str) -> dict[str, str]:
    """Dotted key path → description, for every key with a ``# --`` comment directly above it, in file order."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the maps we are inside
    pending: list[str] | None = None  # the description being read, from its '# --' line on
    block_indent: int | None = None  # inside a block scalar: lines indented deeper than its key
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if block_indent is not None:
            if not stripped or len(line) - len(line.lstrip(" ")) > block_indent:
                continue
            block_indent = None
        if not stripped:
            pending = None  # a blank line ends a comment's association with the next key
            continue
        doc = _DOC.match(line)
        if doc:
            pending = [doc["text"].strip()]
            continue
        comment = _COMMENT.match(line)
        if comment:
            if pending is not None:
                pending.append(comment["text"].strip())
            continue
        key = _KEY.match(line)
        if key is None:  # a list item or the continuation of a value: no key here
            pending = None
            continue
        indent = len(key["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = key["key"].strip("\"'")
        path = ".".join([k for _, k in stack] + [name])
        stack.append((indent, name))
        if _BLOCK_SCALAR.search(line):
            block_indent = indent
        if pending is not None:
            description = " ".join(part for part in pending if part)
            if not description:
                raise ValuesError(f"values.yaml:{number}: '# --' comment without a description above {path}")
            docs[path] = description
        pending = None
    return docs


def leaf_keys(values: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf: a value that is not a non-empty map (scalars, lists, empty maps)."""
    if isinstance(values, dict) and values:
        paths = []
        for key, value in values.items():
            paths.extend(leaf_keys(value, f"{prefix}.{key}" if prefix else str(key)))
        return paths
    return [prefix]


def lookup(values: Any, path: str) -> tuple[bool, Any]:
    node = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def undocumented(values: Any, docs: dict[str, str]) -> list[str]:
    """Leaf keys neither documented themselves nor inside a documented map."""
    missing = []
    for leaf in leaf_keys(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:n]) in docs for n in range(1, len(parts) + 1)):
            missing.append(leaf)
    return missing


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


def cell(text: str) -> str:
    """Text safe inside one table cell: no line break, no unescaped '|', and outside `code` no '<' or '>' that
    markdown would take for an HTML tag (``<bucket>`` would vanish)."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def rows(values_path: Path = VALUES) -> tuple[list[Row], list[str]]:
    """The table's rows in file order, and the leaf keys no comment documents."""
    text = values_path.read_text(encoding="utf-8")
    values = yaml.safe_load(text) or {}
    docs = documented_keys(text)
    table = []
    for path, description in docs.items():
        found, value = lookup(values, path)
        if not found:
            raise ValuesError(f"values.yaml: a '# --' comment documents {path}, which the YAML does not hold")
        default = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
        table.append(Row(path, type_name(value), f"`{cell(default)}`", cell(description)))
    return table, undocumented(values, docs)


def render(table: list[Row]) -> str:
    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{row.key}` | {row.type} | {row.default} | {row.description} |" for row in table]
    return "\n".join(lines)


def replace_table(readme: str, table: str) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValuesError(f"{README.relative_to(REPO)}: needs one {START} line followed by one {END} line")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{table}\n\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when the README's table is out of date")
    mode.add_argument("--write", action="store_true", help="rewrite the table in the README")
    args = parser.parse_args(argv)
    try:
        table, missing = rows()
        text = render(table)
        if not (args.check or args.write):
            print(text)
        else:
            readme = README.read_text(encoding="utf-8")
            updated = replace_table(readme, text)
            if args.write and updated != readme:
                README.write_text(updated, encoding="utf-8")
                print(f"{README.relative_to(REPO)}: values table updated", file=sys.stderr)
            elif args.check and updated != readme:
                print(f"{README.relative_to(REPO)}: the values table is out of date; run "
                      "scripts/chart_values_table.py --write", file=sys.stderr)
                return 1
    except (OSError, ValuesError, yaml.YAMLError) as exc:
        print(f"chart_values_table: {exc}", file=sys.stderr)
        return 1
    if missing:
        print(f"charts/train/values.yaml: no '# --' comment for {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
