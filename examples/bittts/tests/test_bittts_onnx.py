"""The ONNX voice: `bittts export --format onnx` of the shipped 1.58-bit model speaks with onnxruntime and numpy
only (torch's import blocked), as the torch runtime speaks, within the same bounds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import wave

import numpy as np
import pytest
import torch
from bittts.cli import main
from bittts.limits import LimitError
from bittts.synthesis.synthesizer import DEFAULT_MODEL, Synthesizer, shipped_model
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
              pytest.mark.skipif(not shipped_model(DEFAULT_MODEL).is_file(), reason="no shipped model")]

SENTENCES = ["The birch canoe slid on the smooth planks.",
             "A large size in stockings is hard to sell, and so it goes on and on.",
             "Four hours of steady work faced us."]


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    """The shipped ternary model exported as an ONNX voice (once for the module), and its torch runtime."""
    out = tmp_path_factory.mktemp("voice") / "bittts-ternary.onnx"
    assert main(["export", str(shipped_model(DEFAULT_MODEL)), "--format", "onnx", "-o", str(out)]) == 0
    return out, Synthesizer()


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) /
                               np.sum((reference.astype(np.float64) - other) ** 2)))


def blocked(*names: str) -> str:
    """A Python whose imports of `names` (and their submodules) raise, running `bittts` with its arguments; at exit
    it says which ternq modules were imported (none may be: `import ternq` imports torch)."""
    return textwrap.dedent(f"""
        import atexit, sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {names!r}:
                    raise ImportError(name + " is blocked in this test")
        sys.meta_path.insert(0, Refuse())
        atexit.register(lambda: print("ternq modules:", sorted(m for m in sys.modules if m.split(".")[0] == "ternq"),
                                      file=sys.stderr))
        from bittts.cli import main
        sys.exit(main(sys.argv[1:]))
    """)


def run_blocked(names: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", blocked(*names), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)


def test_the_onnx_voice_speaks_with_torch_blocked(voice, tmp_path):
    model, synth = voice
    out = tmp_path / "out.wav"
    run = run_blocked(("torch",), "synthesize", "--model", str(model), "--threads", "1", "--text",
                      " ".join(SENTENCES[:2]), "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "onnxruntime, 1 thread" in run.stdout and "2 sentences" in run.stdout
    assert "ternq modules: []" in run.stderr
    with wave.open(str(out)) as f:
        assert f.getframerate() == synth.sample_rate
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float64) / 32768
    # the sentences as the torch runtime speaks them, with the pause between them
    expected = sum(len(synth.synthesize(s).wav) for s in SENTENCES[:2]) + round(0.2 * synth.sample_rate)
    assert len(pcm) == expected and np.abs(pcm).max() > 0.05
    # the blocker works: the same Python cannot run the torch runtime
    refused = run_blocked(("torch",), "synthesize", "--text", "Hi.", "-o", str(tmp_path / "t.wav"))
    assert refused.returncode != 0 and "torch is blocked" in refused.stderr


def test_without_onnxruntime_an_onnx_voice_says_what_to_install(voice, tmp_path):
    run = run_blocked(("torch", "onnxruntime"), "synthesize", "--model", str(voice[0]), "--text", "Hi.", "-o",
                      str(tmp_path / "t.wav"))
    assert run.returncode == 1 and not (tmp_path / "t.wav").exists()
    assert run.stderr.startswith("bittts synthesize: an ONNX voice runs on onnxruntime, which is not installed: pip "
                                 "install onnxruntime, or pip install 'bittts[onnx]'"), run.stderr


def test_the_onnx_voice_matches_the_torch_runtime(voice):
    from bittts.synthesis.onnx_voice import OnnxSynthesizer

    model, synth = voice
    onnx = OnnxSynthesizer(model, threads=1)
    assert (onnx.sample_rate, onnx.hop, onnx.symbols) == (synth.sample_rate, synth.hop, synth.symbols)
    for sentence in SENTENCES:
        for scale in (1.0, 1.7):
            ours, theirs = onnx.synthesize(sentence, scale), synth.synthesize(sentence, scale).wav.numpy()
            assert ours.wav.dtype == np.float32 and ours.wav.shape == theirs.shape  # the same durations
            assert snr_db(theirs, ours.wav) > 30  # measured 50-57 dB (AVX-512 machine)


def test_the_onnx_voice_is_the_size_of_the_packed_model(voice):
    """The codes stay packed and the graph costs little beside them: short value names, one code table."""
    size = voice[0].stat().st_size
    assert size <= 1.05 * shipped_model(DEFAULT_MODEL).stat().st_size, size  # measured 1.007x (1,176,554 B)
    config = json.loads(voice[0].with_name(voice[0].name + ".json").read_text())
    assert config["onnx"]["opset"] == 18


def test_the_onnx_voice_keeps_the_bounds(voice):
    from bittts.synthesis.onnx_voice import OnnxSynthesizer

    onnx = OnnxSynthesizer(voice[0], threads=1)
    _, ids = onnx.text_to_ids(SENTENCES[1])
    with pytest.raises(LimitError, match="more than 0.5 s of audio"):
        onnx.synthesize_ids(ids, max_seconds=0.5)
    # slowed down 4x, three phonemes outgrow twice their own length: cut in the graph, then refused
    seconds = 2 * onnx.synthesize_ids(ids[:3]).wav.size / onnx.sample_rate
    with pytest.raises(LimitError, match=f"more than {seconds:g} s of audio"):
        onnx.synthesize_ids(ids[:3], max_seconds=seconds, duration_scale=4.0)
    with pytest.raises(LimitError, match="MAX_SENTENCE_PHONEMES"):
        onnx.synthesize_ids(ids * 20)
    with pytest.raises(ValueError, match=r"lie in \[0, "):
        onnx.synthesize_ids([1, 10**6])
    with pytest.raises(ValueError, match="nothing to speak"):
        onnx.synthesize("...")


def test_a_voice_config_that_does_not_describe_its_file_is_refused(voice, tmp_path):
    from bittts.synthesis.onnx_voice import OnnxSynthesizer, config_path

    model = tmp_path / "v.onnx"
    shutil.copy(voice[0], model)
    with pytest.raises(FileNotFoundError, match=r"v.onnx.json not found: an ONNX voice is two files"):
        OnnxSynthesizer(model)
    config = json.loads(config_path(voice[0]).read_text())
    assert config["format"] == "bittts-onnx" and config["audio"] == {"sample_rate": 16000, "hop": 256}
    config_path(model).write_text(json.dumps(config))
    with model.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="its SHA-256 differs"):
        OnnxSynthesizer(model)
    for field, value, message in (("version", 2, "version 2; this bittts reads version 1"),
                                  ("audio", {"sample_rate": 5, "hop": 256}, "audio.sample_rate 5"),
                                  ("symbols", [1, 2], "symbols must be a list"),
                                  ("phonemizer", {"voice": "-x; rm"}, "not an espeak-ng voice name"),
                                  ("onnx", [], "onnx must be an object, not \\[\\]"),
                                  ("n_symbols", None, "n_symbols must be an integer, not null")):
        config_path(model).write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=message):
            OnnxSynthesizer(model)


def test_export_refuses_what_it_cannot_write(tmp_path):
    model = str(shipped_model(DEFAULT_MODEL))
    with pytest.raises(SystemExit, match="is a file: export reads a training run directory"):
        main(["export", model, "-o", str(tmp_path / "m.safetensors")])
    with pytest.raises(SystemExit, match="--checkpoint picks a checkpoint of a RUN_DIR"):
        main(["export", model, "-o", str(tmp_path / "v.onnx"), "--checkpoint", "x.pt"])


def test_export_writes_a_voice_only_where_both_files_can_be(tmp_path):
    # before: through a link to /dev/null the graph went to the device and VOICE.onnx.json beside the link (with
    # the SHA-256 of the empty file read back), and a name whose .json passes 255 bytes failed after the .onnx
    # was written, leaving a pair that does not match
    model = str(shipped_model(DEFAULT_MODEL))
    os.symlink(os.devnull, tmp_path / "null.onnx")
    with pytest.raises(SystemExit, match="null.onnx: is not a regular file; an ONNX voice is two files"):
        main(["export", model, "-o", str(tmp_path / "null.onnx")])
    with pytest.raises(SystemExit, match="has 258 bytes, more than the 255 .*VOICE.onnx.json"):
        main(["export", model, "-o", str(tmp_path / ("v" * 248 + ".onnx"))])
    assert os.listdir(tmp_path) == ["null.onnx"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=12), st.integers(0, 120))
def test_frame_tokens_is_the_length_regulator(durations, max_frames):
    """The graph's length regulator (tensor ops, traced with a data-dependent length) repeats each phoneme by its
    duration, as np.repeat does, cut at max_frames."""
    from bittts.training.export import frame_tokens

    token, frames = frame_tokens(torch.tensor(durations), torch.tensor(max_frames))
    expected = np.repeat(np.arange(len(durations)), durations)[:max_frames]
    assert token.tolist() == expected.tolist() and int(frames) == sum(durations)


def test_the_server_speaks_an_onnx_voice(voice):
    import io
    import threading

    from bittts.synthesis.onnx_voice import OnnxSynthesizer
    from bittts.synthesis.server import SpeechServer
    from bittts_http import http_request

    srv = SpeechServer(("127.0.0.1", 0), OnnxSynthesizer(voice[0], threads=1), jobs=2, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, headers, body = http_request(*srv.server_address[:2], "POST", "/synthesize",
                                             SENTENCES[2].encode(), {"Content-Type": "text/plain; charset=utf-8"})
        health = json.loads(http_request(*srv.server_address[:2], "GET", "/health")[2])
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    assert health["model"] == "bittts-ternary.onnx" and health["sample_rate"] == 16000
    with wave.open(io.BytesIO(body)) as f:
        assert f.getnframes() == len(voice[1].synthesize(SENTENCES[2]).wav)
