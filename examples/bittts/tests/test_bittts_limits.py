"""The work one input may cause is bounded in phonemes and seconds of audio, not characters (issue 17, S2), in
the library (`Synthesizer`, `speak`) and the command line; Ctrl-C on `bittts synthesize` is one line, exit 130."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from bittts import limits
from bittts.synthesis.long_text import count_phonemes, speak
from bittts.synthesis.synthesizer import DEFAULT_MODEL, Synthesizer, shipped_model

MODEL = shipped_model(DEFAULT_MODEL)
pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason="the shipped model is not installed")
DIGITS = "777777777777777 " * 5  # 80 characters, ~970 phonemes ("seven hundred seventy-seven trillion, ...")


def _sigint_as_a_terminal_gives_it() -> None:
    """In the child: SIGINT's default action and unblocked, whatever the test process inherited (a suite run as
    `cmd &` ignores SIGINT; a library may block it in the parent's mask)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.fixture(scope="module")
def synth(one_thread):
    return Synthesizer(MODEL)


def test_a_short_sentence_of_digits_is_refused_by_its_phonemes(synth):
    assert len(DIGITS) < limits.MAX_SENTENCE_CHARS
    assert len(synth.text_to_ids(DIGITS)[1]) > limits.MAX_SENTENCE_PHONEMES
    with pytest.raises(limits.LimitError, match="MAX_SENTENCE_PHONEMES.*split it"):
        synth.synthesize(DIGITS)


def test_seconds_of_audio_are_bounded_before_the_vocoder_runs(synth):
    calls: list[int] = []
    hook = synth.model.vocoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(limits.LimitError, match="more than 0.5 s of audio.*MAX_SENTENCE_SECONDS"):
            synth.synthesize_ids(synth.text_to_ids("The birch canoe slid on the smooth planks.")[1], max_seconds=0.5)
    finally:
        hook.remove()
    assert not calls
    assert synth.synthesize("Hi.").duration > 0  # within the bounds: spoken


def test_speak_bounds_a_request_in_phonemes_and_seconds(synth):
    sentences = ["Hello there.", "How are you?", "Fine, thanks."]
    phonemes = count_phonemes(synth, sentences)
    with pytest.raises(limits.LimitError, match="MAX_REQUEST_PHONEMES"):
        count_phonemes(synth, sentences, max_phonemes=phonemes - 1)
    with pytest.raises(limits.LimitError, match="MAX_REQUEST_PHONEMES"):
        list(speak(synth, sentences, max_phonemes=phonemes - 1))
    with pytest.raises(limits.LimitError, match="more than 1.5 s of audio.*MAX_REQUEST_SECONDS"):
        list(speak(synth, sentences, max_seconds=1.5))
    assert len(b"".join(speak(synth, sentences, max_phonemes=phonemes, max_seconds=60))) > 0


def _bittts(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "bittts.cli", *args], env=env,
                            preexec_fn=_sigint_as_a_terminal_gives_it, **kwargs)


def test_the_command_refuses_digits_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out.wav"
    proc = _bittts("synthesize", "--threads", "1", "--text", DIGITS, "-o", str(out), stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and err.count("\n") == 1 and "MAX_SENTENCE_PHONEMES" in err, err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_ctrl_c_on_synthesize_is_one_line_and_exit_130():
    """Interrupted while it waits for the next line of standard input (after speaking the first)."""
    proc = _bittts("synthesize", "--threads", "1", "--output-raw", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"Hello there.\n")
        proc.stdin.flush()
        assert len(proc.stdout.read(1000)) == 1000  # the first sentence is spoken: the model is loaded
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode() == "bittts synthesize: interrupted\n", err.decode()
