"""``pip install .`` into a fresh venv that already has torch 2.13, as a user would, twice:

* ``pip install --no-index --no-build-isolation``: the extension is built against the venv's
  torch during the install; then ``python -m grng verify --quick`` and ``bench --quick``;
* ``pip install --no-index --find-links <setuptools only>`` (pip's default isolated build):
  the build env has no torch and may download nothing, so a torch build requirement would fail
  at once; the wheel is pure Python plus the C++ sources, and the first ``import grng`` that
  needs the ext backend compiles them into a cache folder (``grng.ops.ext_loader``).

The venv sees this interpreter's packages (torch, triton, ninja) through a .pth file, as
``tools/bootstrap.sh`` does in its system mode; dependencies are resolved (no ``--no-deps``)
against them with ``--no-index``, so any download attempt fails the test. The sources are a
copy without ``tests/`` and ``bench/``; the commands run from an empty temporary directory, so
nothing of the repository is importable. Each test compiles the extension once (25 s to 2 min
on two shared cores).
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
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


def _run(cmd: list[str], cwd: Path, timeout: float, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "GRNG_EXT", "GRNG_EXT_COMPILE")}
    env.pop("TRITON_INTERPRET", None)  # `grng verify` must switch the interpreter on by itself
    env.update(env_extra)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc


def _venv(tmp_path: Path) -> tuple[Path, str, Path]:
    """(copied sources, the fresh venv's python, an empty working folder)."""
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    _copy_sources(src)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, 120)
    py = str(venv / "bin" / "python")
    venv_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(venv_site, "_grng_host_site.pth").write_text("\n".join(_host_site_dirs()) + "\n")
    return src, py, work


def _wheel_of_installed(name: str, dest: Path) -> Path:
    """A wheel of an installed pure-Python distribution (for an offline --find-links folder)."""
    dist = importlib.metadata.distribution(name)
    root = Path(dist.locate_file(""))
    skip = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
    files = [f for f in dist.files or () if not str(f).startswith("..") and "__pycache__" not in str(f)
             and Path(str(f)).name not in skip]
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    out = dest / f"{name}-{dist.version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(out, "w") as zf:
        for f in files:
            data = (root / f).read_bytes()
            zf.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f},sha256={digest},{len(data)}")
        zf.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return out


BACKENDS = "import grng, json; print(json.dumps([grng.__file__, grng.backends()]))"


def test_pip_install_then_verify_and_bench(tmp_path: Path) -> None:
    src, py, work = _venv(tmp_path)
    venv = Path(py).parents[1]
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
          "--no-build-isolation", str(src)], work, 900)

    where = _run([py, "-c", BACKENDS], work, 120, GRNG_EXT_COMPILE="0").stdout
    assert str(venv) in where and str(ROOT) not in where  # the installed copy, not the repository
    if grng.backends()["ext"] == "live":  # this machine compiles the extension: so must the install
        assert '"ext": "live"' in where  # the build from the install, nothing compiled on import

    verify = _run([py, "-m", "grng", "verify", "--quick", "--no-progress"], work, 300).stdout
    assert " 0 FAIL" in verify.splitlines()[-1]
    assert "kfac_step" in verify and "factor_update" in verify

    bench = _run([str(venv / "bin" / "grng"), "bench", "--quick", "--csv", "rows.csv"], work, 300).stdout
    assert "appended" in bench
    rows = (work / "rows.csv").read_text().splitlines()
    assert rows[0].startswith("suite,name,provider,metric,unit") and len(rows) > 20
    assert not (work / "tests").exists() and not (work / "bench").exists()


@pytest.mark.slow
def test_default_isolated_install_downloads_nothing_and_compiles_on_first_use(tmp_path: Path) -> None:
    src, py, work = _venv(tmp_path)
    wheels, cache = tmp_path / "wheels", tmp_path / "cache"
    wheels.mkdir()
    _wheel_of_installed("setuptools", wheels)  # the only build requirement: no torch, no download
    install = _run([py, "-m", "pip", "install", "-v", "--disable-pip-version-check", "--no-index",
                    "--find-links", str(wheels), str(src)], work, 900)
    assert "Successfully installed grng" in install.stdout
    # the build env had no torch: the warning says the extension comes on first use
    assert "grng.ops._C is not built" in install.stdout + install.stderr
    assert "compiled on first use" in install.stdout + install.stderr

    off = _run([py, "-c", BACKENDS], work, 120, GRNG_EXT="0", GRNG_EXT_CACHE=str(cache))
    assert "off: GRNG_EXT=0 is set" in json.loads(off.stdout)[1]["ext"]
    no_compile = _run([py, "-c", BACKENDS], work, 120, GRNG_EXT_COMPILE="0", GRNG_EXT_CACHE=str(cache))
    status = json.loads(no_compile.stdout)[1]["ext"]
    assert "installed without its compiled extension" in status and "GRNG_EXT_COMPILE=0" in status
    assert not cache.exists()  # neither of those compiled anything

    first = _run([py, "-c", BACKENDS], work, 900, GRNG_EXT_CACHE=str(cache))
    status = json.loads(first.stdout)[1]["ext"]
    assert "compiling the ext backend" in first.stderr
    if grng.backends()["ext"].startswith("live"):  # this machine compiles the extension: so must grng
        assert status == f"live (compiled on first use, cached in {next(cache.iterdir())})", status
        op = ("import torch; from grng import ops; M = torch.zeros(5, 5); X = torch.randn(7, 5); "
              "ops.call('factor_update', 'ext', M, X, 1.0, 0.0); "
              "print(torch.allclose(M, X.T @ X, atol=1e-5))")
        second = _run([py, "-c", op], work, 120, GRNG_EXT_CACHE=str(cache))
        assert second.stdout.strip() == "True" and "compiling" not in second.stderr  # cached
    else:  # no compiler here: the message says what failed and what to do
        assert "compiling it on first use failed" in status and "GRNG_EXT_COMPILE=0" in status


@pytest.fixture(autouse=True)
def _needs_pip() -> None:
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available to this interpreter")
