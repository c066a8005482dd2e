"""A synthesis-only install (no `train` / `publish` extras) synthesizes and serves, and the commands that need
an extra say which one to install, in one line."""
from __future__ import annotations

import os
import subprocess
import sys
import wave

import pytest
from bittts.cli import main
from bittts.extras import EXTRAS, require
from bittts.synthesis.synthesizer import DEFAULT_MODEL, shipped_model

MODEL = shipped_model(DEFAULT_MODEL)
BLOCKED = ("tensorboard", "matplotlib")


def _block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make TensorBoard and matplotlib unimportable, as in an install without the extras."""
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED or name.startswith("torch.utils.tensorboard"):
            monkeypatch.setitem(sys.modules, name, None)
    for name in (*BLOCKED, "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.skipif(not MODEL.is_file(), reason="the shipped model is not installed")
def test_synthesize_and_serve_import_neither_tensorboard_nor_matplotlib(tmp_path):
    """In a fresh process where both are unimportable, `bittts synthesize` speaks and `bittts.synthesis.server`
    loads."""
    out = tmp_path / "x.wav"
    code = ("import sys; sys.modules.update({m: None for m in ('tensorboard', 'matplotlib', "
            "'torch.utils.tensorboard')}); import bittts.synthesis.server, bittts.commands.serve; "
            "from bittts.cli import main; "
            f"sys.exit(main(['synthesize', '--text', 'Hi.', '-o', {str(out)!r}, '--threads', '1']))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    with wave.open(str(out), "rb") as f:
        assert f.getnframes() > 0


def test_training_without_the_train_extra_names_it(tmp_path, monkeypatch):
    _block(monkeypatch)
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--preset", "tiny"])
    message = str(info.value.code)
    assert "\n" not in message and message.startswith("bittts train: training ")
    assert "needs tensorboard and matplotlib" in message and "pip install 'bittts[train]'" in message
    with pytest.raises(RuntimeError, match=r"needs matplotlib, .*pip install 'bittts\[publish\]'"):
        require("publish", "the figures")


def test_extras_match_pyproject():
    """The extras `require` names are the ones examples/bittts/pyproject.toml declares, with those packages."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    pyproject = os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    for extra, distributions in EXTRAS.items():
        declared = {req.split(">")[0].split("=")[0].strip() for req in extras[extra]}
        assert declared == set(distributions), (extra, declared)
    assert not any(dep.startswith(BLOCKED) for dep in project["dependencies"])
