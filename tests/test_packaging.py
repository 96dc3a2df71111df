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
