"""How ``setup.py`` builds the optional compiled extension ``grng._C`` (sources in ``csrc/``).

The CPU ops (``csrc/*.cpp``, OpenMP, -O3) are always built; the CUDA sources (``csrc/*.cu``)
join only when torch is a CUDA build and nvcc is found. ``GRNG_CUDA=0`` / ``GRNG_CUDA=1``
forces CUDA off / on. ``GRNG_EXT=0`` skips the extension entirely. A failed compile never
fails the install: it prints a warning, the package stays importable and the op dispatch
falls back to the other backends (``grng.backends()`` says why ``ext`` is not live).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def _warn(msg: str) -> None:
    print(f"\n[grng] WARNING: {msg}\n", file=sys.stderr, flush=True)


def _want_cuda(torch_cuda_build: bool, cuda_home: str | None) -> bool:
    """CUDA sources are built when torch has CUDA and nvcc exists, unless GRNG_CUDA says otherwise."""
    forced = os.environ.get("GRNG_CUDA")
    if forced == "0":
        return False
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
    if forced == "1":
        if not torch_cuda_build:
            _warn("GRNG_CUDA=1 but torch is a CPU build: building the CPU extension only")
            return False
        return True
    return torch_cuda_build and bool(nvcc) and cuda_home is not None


def extension_build_args() -> dict:
    """Return the ``ext_modules``/``cmdclass`` keywords for ``setup()`` ({} when nothing can be built)."""
    if os.environ.get("GRNG_EXT", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # noqa: BLE001 - no torch: pure-Python install
        _warn(f"torch is not importable at build time ({err}); grng._C is not built")
        return {}

    cuda = _want_cuda(torch.version.cuda is not None, cpp_extension.CUDA_HOME)
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    sources = [os.path.relpath(s, ROOT) for s in sources]
    cxx = ["-O3", "-fopenmp", "-DNDEBUG"] + (["-DGRNG_WITH_CUDA"] if cuda else [])
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-DGRNG_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension("grng._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("grng._C", sources, **kwargs)

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(base):  # type: ignore[misc, valid-type]
        """build_ext that turns a failed extension compile into a warning."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure: keep the package installable
                _warn(f"building grng._C failed ({type(err).__name__}: {err}); "
                      "the 'ext' backend is unavailable and grng falls back to the others")

        def build_extension(self, ext) -> None:  # noqa: ANN001 - setuptools Extension
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - as above, per extension
                _warn(f"building {ext.name} failed ({type(err).__name__}: {err}); "
                      "the 'ext' backend is unavailable and grng falls back to the others")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}
