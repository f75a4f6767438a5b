"""How ``setup.py`` builds the compiled extension ``grng._C`` (filled in by the extension work)."""
from __future__ import annotations


def extension_build_args() -> dict:
    """Return the ``ext_modules``/``cmdclass`` keywords for ``setup()`` (none yet)."""
    return {}
