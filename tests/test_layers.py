"""The layer contracts (pyproject's [tool.importlinter]) hold, and no import cycle is left but the known ones."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# None are left (issue 14): any cycle is a failure.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _cycles_module():
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycle_but_the_known_ones():
    mod = _cycles_module()
    found = {tuple(c) for c in mod.cycles(mod.import_graph(ROOT / "src"))}
    assert found - KNOWN_CYCLES == set(), f"new import cycles: {sorted(found - KNOWN_CYCLES)}"


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "vlsearch"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from vlsearch.a import y\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from vlsearch.a.x import g\n")
    (pkg / "z.py").write_text("from vlsearch.a.x import *\n")
    mod = _cycles_module()
    assert mod.cycles(mod.import_graph(tmp_path)) == [["vlsearch.a.x", "vlsearch.a.y"]]
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_cycles.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "vlsearch.a.x <-> vlsearch.a.y" in out.stdout


def test_layer_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is not installed: pip install import-linter (it is in the dev extras)")
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout
