"""The architecture holds: import-linter's contracts in pyproject (layers, a thin CLI, no cycles) are kept.

The contracts are checked on the package as it is installed (`cli/` and `stages/` inside `ddk_cache`), assembled
from this checkout in a temporary folder, so an editable install and a wheel are checked alike. grimp reads
every import statement, function-level ones included. The second test breaks the tree on purpose, so the first
cannot pass by checking nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _assemble(target: Path) -> Path:
    package = target / "ddk_cache"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "ddk_cache", package, ignore=ignore)
    shutil.copytree(REPO / "stages", package / "stages", ignore=ignore)
    shutil.copytree(REPO / "cli", package / "cli", ignore=ignore)
    return package


def _lint(tree: Path) -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([lint, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept(tmp_path):
    _assemble(tmp_path)
    result = _lint(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout and "Analyzed" in result.stdout


def test_a_function_level_cycle_and_a_core_module_importing_a_stage_are_caught(tmp_path):
    package = _assemble(tmp_path)
    header = package / "store" / "format.py"
    header.write_text(header.read_text() + "\n\ndef _sneaky():\n    from ddk_cache.stages import verify_store  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "ddk_cache.store.format -> ddk_cache.stages.verify_store" in result.stdout
    assert "BROKEN" in result.stdout
