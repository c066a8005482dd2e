"""Optional dependencies, grouped as the package's extras (examples/bittts/pyproject.toml), so a synthesis-only
install (`pip install bittts`: synthesize, serve, demo) does not pull TensorBoard or matplotlib."""
from __future__ import annotations

import importlib

__all__ = ["EXTRAS", "require"]

# extra -> the modules it provides (import names)
EXTRAS = {"train": ("tensorboard", "matplotlib"), "publish": ("matplotlib",), "eval": ("pocketsphinx",)}


def require(extra: str, what: str) -> None:
    """RuntimeError (one line, naming the extra to install) if a module of `extra` cannot be imported; called
    before the work that needs it starts, not halfway through it."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeError(f"{what} needs {' and '.join(missing)}, which a synthesis-only install leaves out: "
                           f"pip install 'bittts[{extra}]' (from a checkout: pip install -e 'examples/bittts[{extra}]')")
