"""Load grng's compiled extension ``grng.ops._C``: the build installed with the package, else
the packaged C++ sources compiled on first use against the torch that is running.

Order (:func:`load`): ``GRNG_EXT=0`` switches the extension off (nothing is loaded or
compiled); otherwise ``import grng.ops._C`` (built by ``pip install --no-build-isolation``
or ``setup.py build_ext --inplace``); if there is none, or it does not load against this torch,
``torch.utils.cpp_extension.load`` compiles ``csrc/`` (shipped as ``grng/ops/csrc``) once into
a cache folder per torch version and source hash (``GRNG_EXT_CACHE``, default
``~/.cache/grng``), saying so on stderr, and loads that; ``GRNG_EXT_COMPILE=0`` forbids that
compile (the installed build or nothing). Either way one build is loaded per
process. A failure raises ImportError with the state and what to do; the dispatch reports it
in ``grng.backends()``.

The build options (:func:`build_options`) are shared with ``setup.py`` (``tools/extension.py``
loads this file by path), so the module imports nothing but the standard library at its top.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from pathlib import Path

#: the module name of the built extension (``csrc/register.cpp`` defines ``PyInit__C``)
MODULE = "grng.ops._C"
_HERE = Path(__file__).resolve().parent
_CXX_FLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]


def enabled() -> bool:
    """False when ``GRNG_EXT=0``: the extension is switched off on purpose."""
    return os.environ.get("GRNG_EXT", "1") != "0"


def may_compile() -> bool:
    """False when ``GRNG_EXT_COMPILE=0``: no compile on first use, only an installed build."""
    return os.environ.get("GRNG_EXT_COMPILE", "1") != "0"


def source_dir() -> Path | None:
    """The C++/CUDA sources: ``grng/ops/csrc`` in an installed package, ``csrc/`` in a checkout."""
    for candidate in (_HERE / "csrc", _HERE.parents[1] / "csrc"):
        if (candidate / "register.cpp").is_file():
            return candidate
    return None


def want_cuda(torch_cuda_build: bool, cuda_home: str | None) -> bool:
    """CUDA sources are built when torch has CUDA and nvcc exists; ``GRNG_CUDA=0/1`` forces it
    off / on (on only where torch is a CUDA build)."""
    forced = os.environ.get("GRNG_CUDA")
    if forced == "0" or not torch_cuda_build:
        return False
    if forced == "1":
        return True
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
    return bool(nvcc) and cuda_home is not None


def build_options(csrc: Path, cuda: bool) -> dict:
    """Sources and flags of the extension: every ``*.cpp`` (OpenMP, -O3), plus ``*.cu`` with
    ``cuda``; keys as ``cpp_extension.load`` names them."""
    sources = sorted(str(p) for p in csrc.glob("*.cpp"))
    cxx = _CXX_FLAGS + (["-DGRNG_WITH_CUDA"] if cuda else [])
    opts = {"sources": sources, "extra_cflags": cxx, "extra_ldflags": ["-fopenmp"]}
    if cuda:
        opts["sources"] += sorted(str(p) for p in csrc.glob("*.cu"))
        opts["extra_cuda_cflags"] = ["-O3", "-DGRNG_WITH_CUDA"]
    return opts


def cache_dir(csrc: Path, cuda: bool) -> Path:
    """Where the on-demand build goes: one folder per torch version, Python, CPU/CUDA and the
    sources' hash (so an upgrade of either compiles afresh instead of loading a stale build)."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(csrc.iterdir()):
        if path.suffix in (".cpp", ".cu", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    root = Path(os.environ.get("GRNG_EXT_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grng")
    tag = (f"ext-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{'cuda' if cuda else 'cpu'}-{digest.hexdigest()[:12]}")
    return root / tag.replace("+", "_")


def _say(msg: str) -> None:
    print(f"[grng] {msg}", file=sys.stderr, flush=True)


def _compile(installed_error: str) -> str:
    """Compile (or reuse the cached build of) the packaged sources and load it; return how."""
    if not may_compile():
        raise ImportError(f"{installed_error}, and GRNG_EXT_COMPILE=0 forbids compiling it on "
                          f"first use (unset it to compile the packaged sources once, or install "
                          f"with `pip install --no-build-isolation` next to your torch)")
    import torch
    from torch.utils import cpp_extension

    csrc = source_dir()
    if csrc is None:
        raise ImportError(f"{installed_error}, and this grng has no C++ sources to compile "
                          f"(looked in {_HERE / 'csrc'}): reinstall grng from its source")
    cuda = want_cuda(torch.version.cuda is not None, cpp_extension.CUDA_HOME)
    build = cache_dir(csrc, cuda)
    try:
        build.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ImportError(f"{installed_error}, and its build folder {build} cannot be made ({err}): "
                          f"set GRNG_EXT_CACHE to a writable folder") from err
    cached = any(build.glob("_C*.so"))
    if not cached:
        _say(f"{installed_error}: compiling the ext backend from {csrc} against torch "
             f"{torch.__version__} ({'CPU and CUDA' if cuda else 'CPU'} kernels) into {build}; "
             f"once per torch version, a few minutes. GRNG_EXT_COMPILE=0 skips this "
             f"(grng then runs its other backends).")
    try:
        cpp_extension.load(name="_C", build_directory=str(build), is_python_module=False,
                           verbose=False, **build_options(csrc, cuda))
    except Exception as err:  # noqa: BLE001 - compiler, ninja or linker missing or failing
        text = str(err).strip().splitlines()
        log = build / "build.log"
        log.write_text(str(err) + "\n")
        raise ImportError(
            f"{installed_error}, and compiling it on first use failed ({type(err).__name__}: "
            f"{text[0] if text else ''} ... full output in {log}). It needs a C++17 compiler, "
            f"ninja (`pip install ninja`) and the Python headers; fix that and import grng again "
            f"(or install with `pip install --no-build-isolation`), or set GRNG_EXT_COMPILE=0 "
            f"to stop trying: grng runs its other backends meanwhile") from err
    if not cached:
        _say(f"compiled the ext backend into {build}")
    return f"compiled on first use, cached in {build}"


def load() -> str:
    """Load the extension once (its import runs the ``TORCH_LIBRARY(grng_ext)`` registrations);
    return how it was found ("" for the installed build, else where it was compiled). Raise
    ImportError saying the state and what to do."""
    if not enabled():
        raise ImportError("off: GRNG_EXT=0 is set, so the compiled ops are neither loaded nor "
                          "compiled (unset GRNG_EXT to use them)")
    try:
        importlib.import_module(MODULE)
        return ""
    except ModuleNotFoundError as err:
        if err.name != MODULE:
            raise
        installed_error = "grng was installed without its compiled extension"
    except ImportError as err:  # built against another torch: its library failed to load
        installed_error = f"the installed {MODULE} does not load against this torch ({err})"
    return _compile(installed_error)
