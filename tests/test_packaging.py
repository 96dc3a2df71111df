"""The installed distribution exposes ddk_cache.cli and ddk_cache.stages, never top-level cli/stages."""

from __future__ import annotations

import shutil
import subprocess
import sys


def test_console_script_runs_and_namespaces_are_correct(tmp_path):
    probe = (
        "import importlib.util as u, ddk_cache.cli.main, ddk_cache.stages.teacher_dump;"
        "assert u.find_spec('cli') is None and u.find_spec('stages') is None, 'top-level module shipped'"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True)  # cwd away from the checkout
    script = shutil.which("ddk-cache")
    assert script is not None, "console script 'ddk-cache' is not installed"
    result = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "teacher-dump" in result.stdout and "inspect" in result.stdout


def test_every_sub_package_is_installed():
    """A package folder missing from pyproject's list works in an editable install and is absent from the wheel."""
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    folders = {"ddk_cache": "ddk_cache", "stages": "ddk_cache.stages", "cli": "ddk_cache.cli"}
    found = set()
    for folder, package in folders.items():
        for init in (repo / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(repo / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed, f"not installed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
    assert all(tool["package-dir"].get(p) for p in ("ddk_cache.stages", "ddk_cache.cli", "ddk_cache.cli.commands"))
