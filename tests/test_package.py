"""fastalex.kernels imports correctly from an editable install and from a built wheel."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import fastalex, fastalex.kernels.conv2d as k; print(fastalex.__file__); print(k.__file__)"


def _python(code: str, cwd: Path, **env) -> list[str]:
    full = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_wheel_contains_kernels_as_subpackage_and_imports(tmp_path):
    # Build from a copy: building in place would leave build/ and an egg-info in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".benchmarks"))
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheel_dir.glob("fastalex-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastalex/kernels/conv2d.py" in names and "fastalex/kernels/maxpool2d.py" in names
    assert "fastalex/ops/conv2d.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would clash on PyPI"

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # Run from an empty folder with the wheel's files first on the path: not the checkout.
    pkg, kern = _python(PROBE, cwd=tmp_path, PYTHONPATH=str(target))
    assert Path(pkg).is_relative_to(target) and Path(kern).is_relative_to(target / "fastalex" / "kernels")


def test_editable_install_maps_kernels(tmp_path):
    # The installed distribution (an egg-info that setuptools leaves in the checkout has no direct_url.json).
    urls = [d.read_text("direct_url.json") for d in metadata.distributions(name="fastalex")]
    if not any(u and json.loads(u).get("dir_info", {}).get("editable") for u in urls):
        pytest.skip("fastalex is not installed in editable mode here")
    pkg, kern = _python(PROBE, cwd=tmp_path)
    assert Path(pkg) == ROOT / "fastalex" / "__init__.py"
    assert Path(kern) == ROOT / "kernels" / "conv2d.py"
