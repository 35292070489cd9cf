"""The package's shape (docs/architecture.md): layers that import downwards only, no import cycles, small modules.

The contracts are import-linter's, in pyproject.toml ([tool.importlinter]); they count imports inside
functions too, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "dbbatch"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 430  # "about 400": a module past this is two concerns (docs/architecture.md, "Adding code")


def _lint_imports(root: Path, env_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(env_path)})


def test_the_layers_and_no_cycles_contracts_are_kept():
    got = _lint_imports(REPO, REPO)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-2000:]
    assert got.stdout.count(" KEPT") == 3, got.stdout[-2000:]


def test_negative_control_an_upward_import_inside_a_function_breaks_both_contracts(tmp_path: Path):
    shutil.copytree(PACKAGE, tmp_path / "dbbatch", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    layout = tmp_path / "dbbatch" / "store" / "layout.py"
    layout.write_text(layout.read_text() + "\n\ndef _upward():\n    from dbbatch.quality.report import build  # noqa\n")
    got = _lint_imports(tmp_path, tmp_path)
    assert got.returncode != 0
    assert "Layers: each imports only the ones below it BROKEN" in got.stdout, got.stdout[-2000:]
    assert "cycles between sibling modules or subpackages, at any depth BROKEN" in got.stdout, got.stdout[-2000:]
    assert "dbbatch.store.layout -> dbbatch.quality.report" in got.stdout


def test_no_module_is_over_about_400_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}, "split along the data flow (docs/architecture.md)"


def test_docs_architecture_names_every_module():
    doc = (REPO / "docs" / "architecture.md").read_text()
    modules = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if f"`{m}`" not in doc and f"`{Path(m).name}`" not in doc]
    assert not missing, f"docs/architecture.md does not name: {missing}"
