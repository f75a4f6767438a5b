"""How ``setup.py`` builds the optional compiled extension ``grng.ops._C`` (sources in ``csrc/``).

The extension is built only where torch is importable while setup.py runs, i.e. with
``pip install --no-build-isolation`` (pip's default isolated build has no torch, and the build
requirements deliberately do not name it: that would download a second torch). Otherwise, or
when ``GRNG_EXT=0``, the wheel is pure Python plus the sources (``grng/ops/csrc``), a warning
says so, and ``grng.ops.ext_loader`` compiles them on first use against the torch that runs.
The sources and flags come from ``grng/ops/ext_loader.py`` (loaded by path: the package's
dependencies need not be importable here): the CPU ops always, the CUDA sources where torch is
a CUDA build and nvcc is found (``GRNG_CUDA=0/1`` forces that). A failed compile never fails
the install: it prints a warning, and the loader tries again on first use.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _warn(msg: str) -> None:
    print(f"\n[grng] WARNING: {msg}\n", file=sys.stderr, flush=True)


def _loader():
    """``grng/ops/ext_loader.py`` as a stand-alone module (stdlib imports only at its top)."""
    spec = importlib.util.spec_from_file_location("_grng_ext_loader", ROOT / "grng" / "ops" / "ext_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_build_args() -> dict:
    """Return the ``ext_modules``/``cmdclass`` keywords for ``setup()`` ({} when nothing is built)."""
    later = ("the sources are packaged and compiled on first use against the torch that runs "
             "(GRNG_EXT_COMPILE=0 at run time forbids that)")
    if os.environ.get("GRNG_EXT", "1") == "0":
        _warn(f"GRNG_EXT=0: grng.ops._C is not built; {later}")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # noqa: BLE001 - no torch (pip's isolated build): pure-Python wheel
        _warn(f"torch is not importable at build time ({err}), so grng.ops._C is not built "
              f"(`pip install --no-build-isolation` builds it against your torch); {later}")
        return {}

    loader = _loader()
    cuda = loader.want_cuda(torch.version.cuda is not None, cpp_extension.CUDA_HOME)
    opts = loader.build_options(CSRC, cuda)
    sources = [os.path.relpath(s, ROOT) for s in opts["sources"]]
    kwargs = dict(extra_compile_args={"cxx": opts["extra_cflags"]}, extra_link_args=opts["extra_ldflags"])
    if cuda:
        kwargs["extra_compile_args"]["nvcc"] = opts["extra_cuda_cflags"]
        ext = cpp_extension.CUDAExtension(loader.MODULE, sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension(loader.MODULE, sources, **kwargs)

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(base):  # type: ignore[misc, valid-type]
        """build_ext that turns a failed extension compile into a warning."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure: keep the package installable
                _warn(f"building grng.ops._C failed ({type(err).__name__}: {err}); {later}")

        def build_extension(self, ext) -> None:  # noqa: ANN001 - setuptools Extension
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - as above, per extension
                _warn(f"building {ext.name} failed ({type(err).__name__}: {err}); {later}")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}
