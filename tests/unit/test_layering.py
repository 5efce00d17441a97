"""The package's shape, as DESIGN.md names it: which modules may import what (read statically from the
module-level imports, followed transitively, so a violation names its import chain), and no long functions.

Imports inside functions are deliberate lazy imports (e.g. torch in the checkpoint reader) and are not followed;
``if TYPE_CHECKING:`` blocks are not imports at run time either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "trainer"
MAX_FUNCTION_LINES = 60
PARSER_TABLES = {"trainer/cli.py::build_parser"}  # argument-parser tables: long by nature, flat to read


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If | ast.Try) and not _is_type_checking(node):
            for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                          *[handler.body for handler in getattr(node, "handlers", [])]):
                found.extend(_top_level_imports(block))
    return found


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


@cache
def direct_imports(module: str) -> frozenset[str]:
    """Modules (ours with their parent packages, and third-party top-level names) imported at load time."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _top_level_imports(tree.body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                   else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
        for target in targets:
            names |= _with_parents(target) if target.startswith("trainer") else {target.split(".")[0]}
    return frozenset(name for name in names if name != module)


def import_chain(module: str, forbidden: set[str]) -> list[str] | None:
    """The first chain of load-time imports from ``module`` to one of ``forbidden`` (breadth first), or None."""
    queue, seen = [[module]], {module}
    while queue:
        chain = queue.pop(0)
        for name in sorted(direct_imports(chain[-1])):
            if name in forbidden or name.split(".")[0] in forbidden:
                return [*chain, name]
            if name in MODULES and name not in seen:
                seen.add(name)
                queue.append([*chain, name])
    return None


# DESIGN.md: annotations/ and storage.py never import torch; the CLI, the training entry point, the checkpoint
# mechanism and the lease stay torch-free too (a resumed run fetches its checkpoint while torch is imported);
# plots and progress lines serve `trainer watch` and the metrics log beside training; MLflow tracking runs beside
# training too (and imports mlflow only when it is on).
TORCH_FREE = sorted(
    [name for name in MODULES if name.startswith("trainer.annotations")]
    + ["trainer.storage", "trainer.config", "trainer.cli", "trainer.train", "trainer.lease", "trainer.checkpoint",
       "trainer.checkpoint.layout", "trainer.checkpoint.commit", "trainer.checkpoint.store", "trainer.progress",
       "trainer.plots", "trainer.run_log", "trainer.watch", "trainer.exit_codes", "trainer.errors", "trainer.logs",
       "trainer.stop_signal", "trainer.tracking"])


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_import_no_torch(module: str) -> None:
    chain = import_chain(module, {"torch", "torchvision"})
    assert chain is None, " -> ".join(chain or [])


def test_the_fast_eval_extra_is_imported_only_where_it_is_used() -> None:
    """faster-coco-eval comes with the ``fast-eval`` extra: no module loads it at import time, so a run on the
    default pycocotools backend never needs it installed (config.py only looks it up, with find_spec)."""
    chains = [" -> ".join(chain) for module in MODULES if (chain := import_chain(module, {"faster_coco_eval"}))]
    assert not chains, chains


def test_engine_never_touches_storage() -> None:
    """DESIGN.md: engine.py computes (one step, one evaluation pass); where things are stored is decided above it."""
    chain = import_chain("trainer.engine", {"trainer.storage", "boto3", "botocore"})
    assert chain is None, " -> ".join(chain or [])


WIRING = {"trainer.train", "trainer.loop", "trainer.run", "trainer.cli", "trainer.launch", "trainer.__main__"}


def test_nothing_imports_the_wiring_except_the_wiring() -> None:
    """Only the entry points and the training story wire the pieces together: no piece imports them back (no
    layer reaches up), so every piece can be used and tested alone."""
    upward = {f"{module} imports {name}" for module in MODULES if module not in WIRING
              for name in direct_imports(module) if name in WIRING}
    assert not upward, sorted(upward)
    assert "trainer.loop" not in {n for m in WIRING - {"trainer.train"} for n in direct_imports(m)}
    assert "trainer.run" not in {n for m in WIRING - {"trainer.loop"} for n in direct_imports(m)}


def test_annotations_do_not_depend_on_the_training_side() -> None:
    """The converter runs in an init job with no GPU and no training code: annotations/ needs only storage,
    config-free helpers and the errors."""
    allowed = {"trainer", "trainer.storage", "trainer.errors"}
    outside = {f"{module} imports {name}" for module in MODULES if module.startswith("trainer.annotations")
               for name in direct_imports(module)
               if name.startswith("trainer") and name not in allowed and not name.startswith("trainer.annotations")}
    assert not outside, sorted(outside)


def test_the_checkpoint_package_reexports_only_its_mechanism() -> None:
    """``trainer.checkpoint`` (the public names) loads the torch-free mechanism only; state and policy (torch,
    the run's pieces) are imported by name where they are needed."""
    inside = {name for name in direct_imports("trainer.checkpoint") if name.startswith("trainer.checkpoint.")}
    assert inside == {"trainer.checkpoint.layout", "trainer.checkpoint.commit", "trainer.checkpoint.store"}


def test_the_static_reading_agrees_with_a_real_import() -> None:
    """The same torch-free claim, checked by importing the modules in a fresh interpreter (catches what a static
    reading could miss, e.g. an import hidden in a module-level call)."""
    modules = ", ".join(TORCH_FREE)
    code = f"import sys, {modules}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


def test_no_function_is_longer_than_a_screen() -> None:
    """Each function in trainer/ reads on one screen (argument-parser tables excepted): longer ones hide steps
    that deserve a name."""
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                where = f"{path.relative_to(REPO)}::{node.name}"
                if length > MAX_FUNCTION_LINES and where not in PARSER_TABLES:
                    long.append(f"{where} ({length} lines)")
    assert not long, long


def test_the_reader_sees_the_lazy_imports_it_skips() -> None:
    """A guard on the guard: the reader must find the load-time imports that matter (else every rule above would
    pass vacuously)."""
    assert "torch" in direct_imports("trainer.engine")
    assert "trainer.storage" in direct_imports("trainer.checkpoint.commit")
    assert "torch" not in direct_imports("trainer.checkpoint.store")  # imported lazily, where tensors are loaded
    assert import_chain("trainer.loop", {"torch"}) == ["trainer.loop", "torch"]
