"""A side virtualenv with an older transformers, built once and cached under the temp folder, so tests
can check that what we export loads there. `side_python()` returns its python or skips with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import pytest

TRANSFORMERS = "transformers==4.46.3"


def side_python(requirement: str = TRANSFORMERS) -> Path:
    """The python of a venv holding `requirement` (built on first use, reused after); skips the test when
    it cannot be built (no package registry)."""
    name = "productvlm-" + requirement.replace("==", "").replace(".", "").replace("transformers", "tf")
    root = Path(tempfile.gettempdir()) / f"{name}-venv"
    python = root / "bin" / "python"
    if (root / "complete").is_file():
        return python
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        venv.EnvBuilder(with_pip=True).create(tmp)
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"could not create a virtualenv here (venv/ensurepip): {e}")
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, requirement], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"could not build a venv with {requirement} (no package registry?): {done.stderr[-300:]}")
    (tmp / "complete").write_text(sys.version, encoding="utf-8")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)  # venv scripts name their folder; only `python` (a symlink) is used, so this is safe
    return python
