"""``pip install .`` into a fresh venv, then ``python -m grng verify --quick`` and ``bench --quick``.

The venv sees this interpreter's packages (torch, triton, the build tools) through a .pth file,
as ``tools/bootstrap.sh`` does in its system mode, and installs grng with
``pip install --no-deps --no-index --no-build-isolation`` from a copy of the package sources
without ``tests/`` and ``bench/``; the commands then run from an empty temporary directory, so
nothing of the repository is importable. The compiled extension is built in the process
(about 25 s on two cores).
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import grng

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "tools", "csrc", "grng", "kernels")


def _host_site_dirs() -> list[str]:
    """Where this interpreter's third-party packages live (its site dirs and .pth additions)."""
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def _copy_sources(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("TRITON_INTERPRET", None)  # `grng verify` must switch the interpreter on by itself
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc


def test_pip_install_then_verify_and_bench(tmp_path: Path) -> None:
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    _copy_sources(src)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, 120)
    py = str(venv / "bin" / "python")
    venv_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(venv_site, "_grng_host_site.pth").write_text("\n".join(_host_site_dirs()) + "\n")
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-index",
          "--no-build-isolation", str(src)], work, 600)

    where = _run([py, "-c", "import grng, grng.kernels, json; print(json.dumps([grng.__file__, "
                  "grng.backends()]))"], work, 120).stdout
    assert str(venv) in where and str(ROOT) not in where  # the installed copy, not the repository
    if grng.backends()["ext"] == "live":  # this machine compiles the extension: so must the install
        assert '"ext": "live"' in where

    verify = _run([py, "-m", "grng", "verify", "--quick", "--no-progress"], work, 300).stdout
    assert " 0 FAIL" in verify.splitlines()[-1]
    assert "kfac_step" in verify and "factor_update" in verify

    bench = _run([str(venv / "bin" / "grng"), "bench", "--quick", "--csv", "rows.csv"], work, 300).stdout
    assert "appended" in bench
    rows = (work / "rows.csv").read_text().splitlines()
    assert rows[0].startswith("suite,name,provider,metric,unit") and len(rows) > 20
    assert not (work / "tests").exists() and not (work / "bench").exists()


@pytest.fixture(autouse=True)
def _needs_pip() -> None:
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available to this interpreter")
