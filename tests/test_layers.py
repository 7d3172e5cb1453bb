"""The package's floors (docs/architecture.md): the import-linter contracts in pyproject.toml hold, and
nothing but the package's face lies outside the floors' folders."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fairchem_equiformerv2"
FLOORS = {"so3", "nn", "model", "adapters", "tools"}
FACE = {"__init__.py", "errors.py", "runtime.py"}


def lint_imports() -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed (pip install -e '.[dev]' brings import-linter)")
    return subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)


def test_import_contracts_are_kept():
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def test_the_top_level_holds_only_the_face_and_the_floors():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert entries == FACE | FLOORS
    assert all((PACKAGE / floor / "__init__.py").exists() for floor in FLOORS)
