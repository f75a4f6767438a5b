"""How grng finds its compiled extension (``grng.ops.ext_loader``), what ``grng.backends()``
says about it, and what ``setup.py`` builds. The install itself: tests/test_cli_install.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from grng.ops import dispatch, ext_loader

ROOT = Path(__file__).resolve().parents[1]


def test_grng_ext_0_switches_the_extension_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRNG_EXT", "0")
    with pytest.raises(ImportError, match="off: GRNG_EXT=0 is set.*neither loaded nor compiled"):
        ext_loader.load()


def test_grng_ext_compile_0_forbids_the_compile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRNG_EXT_COMPILE", "0")
    monkeypatch.setenv("GRNG_EXT_CACHE", str(tmp_path))
    with pytest.raises(ImportError, match="installed without.*GRNG_EXT_COMPILE=0 forbids compiling"):
        ext_loader._compile("grng was installed without its compiled extension")
    assert not any(tmp_path.iterdir())


def test_a_failed_compile_says_what_failed_and_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """Sources that cannot compile (nothing is loaded into this process): the ImportError names
    the failure, the log, the requirements and the switch."""
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "register.cpp").write_text('#error "broken on purpose"\n')
    monkeypatch.setattr(ext_loader, "source_dir", lambda: broken)
    monkeypatch.setenv("GRNG_EXT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ImportError) as info:
        ext_loader._compile("grng was installed without its compiled extension")
    text = str(info.value)
    assert "compiling it on first use failed" in text and "C++17 compiler" in text
    assert "GRNG_EXT_COMPILE=0" in text
    log = Path(text.split("full output in ")[1].split(")")[0])
    assert log.is_file() and log.parent.parent == tmp_path / "cache"


def test_the_sources_are_found_in_a_checkout_and_the_cache_follows_them(tmp_path: Path) -> None:
    assert ext_loader.source_dir() == ROOT / "csrc"  # grng/ops/csrc exists only when installed
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "register.cpp").write_text("// a\n")
    first = ext_loader.cache_dir(src, cuda=False)
    assert first != ext_loader.cache_dir(src, cuda=True)
    (src / "register.cpp").write_text("// b\n")
    assert ext_loader.cache_dir(src, cuda=False) != first


def test_cuda_sources_join_only_with_a_cuda_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRNG_CUDA", raising=False)
    assert not ext_loader.want_cuda(False, "/usr/local/cuda")
    monkeypatch.setenv("GRNG_CUDA", "1")
    assert ext_loader.want_cuda(True, None) and not ext_loader.want_cuda(False, None)
    monkeypatch.setenv("GRNG_CUDA", "0")
    assert not ext_loader.want_cuda(True, "/usr/local/cuda")
    opts = ext_loader.build_options(ROOT / "csrc", cuda=True)
    assert any(s.endswith(".cu") for s in opts["sources"]) and "-DGRNG_WITH_CUDA" in opts["extra_cflags"]
    assert not any(s.endswith(".cu") for s in ext_loader.build_options(ROOT / "csrc", False)["sources"])


def test_backends_say_how_the_extension_was_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dispatch._LOADED, "ext", "live")
    monkeypatch.setitem(dispatch._NOTES, "ext", "compiled on first use, cached in /c")
    assert dispatch.backends()["ext"] == "live (compiled on first use, cached in /c)"
    monkeypatch.setitem(dispatch._NOTES, "ext", "")
    assert dispatch.backends()["ext"] == "live"


def _setup_rules():
    spec = importlib.util.spec_from_file_location("grng_tools_extension", ROOT / "tools" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_builds_grng_ops_C_from_csrc(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("GRNG_CUDA", "0")
    args = _setup_rules().extension_build_args()
    (ext,) = args["ext_modules"]
    assert ext.name == ext_loader.MODULE == "grng.ops._C"
    assert sorted(ext.sources) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    monkeypatch.setenv("GRNG_EXT", "0")
    assert _setup_rules().extension_build_args() == {}
    assert "grng.ops._C is not built" in capsys.readouterr().err


def test_an_unwritable_cache_says_which_variable_moves_it(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("GRNG_EXT_CACHE", str(blocker / "sub"))  # a folder under a file: no
    with pytest.raises(ImportError, match="cannot be made.*set GRNG_EXT_CACHE to a writable folder"):
        ext_loader._compile("grng was installed without its compiled extension")
