"""One module per `bittts` subcommand, and the checks of their arguments that they share.

Every command checks what it will write and read before the slow work starts (ValueError naming the option and
the fix), and `bittts.cli` reports the exception types in `INPUT_ERRORS` as one line, without a traceback.
"""
from __future__ import annotations

import os
import pickle
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..synthesis.voice import Voice

# What the commands count as bad input (a missing or unreadable file, a malformed model or checkpoint, a wrong
# option value, a failing external tool): `bittts.cli` reports these as one line, not a traceback.
INPUT_ERRORS = (OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError, subprocess.CalledProcessError)

NAME_MAX = 255  # bytes of one file name on Linux / macOS file systems


def max_threads() -> int:
    """The most torch threads a command accepts: the CPUs of this machine (more only oversubscribes them, and
    torch crashes on absurd counts)."""
    return os.cpu_count() or 1


def check_threads(values: list[int] | int | None, option: str = "--threads") -> None:
    """Refuse thread counts outside 1 .. `max_threads()`."""
    for n in [values] if isinstance(values, int) else values or []:
        if not 1 <= n <= max_threads():
            raise ValueError(f"{option} {n}: expected 1 to {max_threads()} (the CPUs of this machine)")


def load_voice(model: str | None, threads: int | None) -> Voice:
    """--model on its runtime with --threads: an ONNX voice (``.onnx``) on onnxruntime
    (`bittts.synthesis.onnx_voice.OnnxSynthesizer`, torch is never imported), anything else a packed safetensors
    model on torch (`bittts.synthesis.synthesizer.Synthesizer`; None: the shipped 1.58-bit model)."""
    if model is not None and model.lower().endswith(".onnx"):
        from ..synthesis.onnx_voice import OnnxSynthesizer

        return OnnxSynthesizer(model, threads=threads)
    import torch

    from ..synthesis.synthesizer import Synthesizer

    if threads is not None:
        torch.set_num_threads(threads)
    return Synthesizer(model)


def output_file(path: str | os.PathLike[str], option: str = "-o", example: str = "out.wav") -> Path:
    """Check that `path` can be written as a file: a file name (not a directory, not too long) in a writable
    directory; a missing directory is created. Returns the path."""
    text = os.fspath(path)
    out = Path(text)
    if len(os.fsencode(out.name)) > NAME_MAX:
        raise ValueError(f"{option} {text[:60]}...: the file name has {len(os.fsencode(out.name))} bytes, more "
                         f"than the {NAME_MAX} a file system allows; choose a shorter name")
    if not out.name or text.endswith(os.sep) or out.is_dir():
        raise ValueError(f"{option} {text}: is a directory; give a file path, e.g. {option} "
                         f"{os.path.join(text, example)}")
    try:
        mode = os.stat(text).st_mode
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):  # written through (ternq.atomic)
        if not os.access(text, os.W_OK):
            raise ValueError(f"{option} {text}: is not writable; choose another output")
        return out
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file"
        raise ValueError(f"{option} {text}: is {kind}; give a file path, e.g. {option} {example}")
    real = Path(os.path.realpath(text))  # a symlink's target is written (the link stays), in its own directory
    _writable_dir(real.parent, option, text)
    return out


WAV_SUFFIXES = ("", ".wav", ".wave")  # what an audio output may be named: audio is written as WAV only


# audio formats someone may ask for by name: refused for a directory of wavs too (out.mp3/0001.wav is a mistake)
OTHER_AUDIO_SUFFIXES = (".mp3", ".ogg", ".oga", ".opus", ".flac", ".m4a", ".aac", ".aif", ".aiff", ".au", ".raw",
                        ".pcm", ".wma", ".webm")


def _refuse_other_audio(path: str | os.PathLike[str], option: str) -> None:
    suffix = Path(os.fspath(path)).suffix
    raise ValueError(f"{option} {os.fspath(path)}: bittts writes WAV only, not {suffix}; name the file .wav "
                     "and convert it (e.g. ffmpeg -i out.wav out" + suffix + ")")


def wav_output(path: str | os.PathLike[str], option: str = "-o") -> Path:
    """`output_file` for audio: a name whose extension promises another format (out.mp3, out.flac) is refused
    rather than filled with WAV bytes."""
    if Path(os.fspath(path)).suffix.lower() not in WAV_SUFFIXES:
        _refuse_other_audio(path, option)
    return output_file(path, option)


def wav_dir(path: str | os.PathLike[str], option: str = "-o") -> Path:
    """`output_dir` for a directory of wavs; a name that asks for another audio format (out.mp3) is refused."""
    if Path(os.fspath(path)).suffix.lower() in OTHER_AUDIO_SUFFIXES:
        _refuse_other_audio(path, option)
    return output_dir(path, option)


def output_dir(path: str | os.PathLike[str], option: str = "-o") -> Path:
    """Check that `path` is (or can be created as) a writable directory; creates it. Returns the path."""
    text = os.fspath(path)
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {text}: exists and is not a directory; give a directory path")
    _writable_dir(out, option, text)
    return out


def _writable_dir(directory: Path, option: str, given: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {given}: cannot create directory {directory}: {e.strerror}; choose another "
                         "location") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {given}: directory {directory} is not writable; choose another location")
