"""The wheel holds every module of the source tree (packages are discovered, not listed by hand)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def source_modules() -> set[str]:
    """Paths the wheel must hold: onnxstack/**.py, and cli/*.py as onnxstack/cli/*.py."""
    names = {p.relative_to(REPO).as_posix() for p in (REPO / "onnxstack").rglob("*.py") if "__pycache__" not in p.parts}
    names |= {f"onnxstack/cli/{p.name}" for p in (REPO / "cli").glob("*.py")}
    return names


def test_wheel_holds_every_module(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a clean copy: no build/ folder of an earlier build can fill the gaps
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("onnxstack", "cli"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("onnxstack-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(source_modules() - files)
    assert not missing, f"the wheel lacks {missing}"
    assert "onnxstack/torch_bridge/__init__.py" in files
