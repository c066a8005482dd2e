"""Hostile input to the `bittts` commands: every bad argument, file and forged model gives one line naming the
thing and the fix, a non-zero exit, no traceback and no signal; what is read has a size bound."""
from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from bittts.cli import main
from bittts.config import apply_overrides, load_preset
from bittts.evaluation.evaluate import read_sentences
from bittts.limits import MAX_SENTENCE_CHARS, MAX_TEXT_BYTES
from bittts.synthesis.synthesizer import DEFAULT_MODEL, read_model_metadata, shipped_model
from bittts.training.checkpoints import load_checkpoint
from bittts.training.loop import train, truncate_metrics
from bittts_synthetic import N_SYMBOLS, SyntheticTTS

MODEL = shipped_model(DEFAULT_MODEL)
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="the shipped model is not installed")


def tiny(*overrides: str):
    cfg = apply_overrides(load_preset("tiny"), list(overrides))
    cfg.acoustic.n_symbols = N_SYMBOLS
    return cfg


def fails(argv: list[str], match: str) -> str:
    """`bittts ARGV` exits with one line "bittts COMMAND: ..." matching `match`."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith(f"bittts {argv[0]}: ") and "\n" not in message, message
    assert re.search(match, message), message
    return message


# --- 9. every command: one line, no traceback ----------------------------------------------------------------------


def test_train_and_prepare_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    garbage = tmp_path / "run" / "checkpoint.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(random.Random(0).randbytes(1000))
    for seed in range(40):  # torch.load fails on foreign bytes with UnpicklingError, IndexError, KeyError, ...
        (tmp_path / "g.pt").write_bytes(random.Random(seed).randbytes(1000))
        with pytest.raises(ValueError, match="not a BitTTS training checkpoint"):
            load_checkpoint(tmp_path / "g.pt")
    d, f = str(tmp_path / "empty"), str(tmp_path / "file")
    fails(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--preset", "tiny"],
          "--data .*nope: not a directory; prepare a corpus")
    fails(["train", "--data", f, "--out", str(tmp_path / "r"), "--preset", "tiny"], "not a directory")
    fails(["train", "--data", d, "--out", str(tmp_path / "r"), "--preset", "tiny"], "not a complete prepared corpus")
    fails(["train", "--data", d, "--out", f, "--preset", "tiny"], "--out .*file: exists and is not a directory")
    fails(["train", "--data", d, "--out", str(tmp_path / "r"), "--config", str(tmp_path / "no.toml")],
          "no.toml: No such file or directory")
    fails(["train", "--data", d, "--out", str(tmp_path / "r"), "--config", f], "invalid TOML")
    fails(["train", "--data", d, "--out", str(tmp_path / "r"), "--preset", "tiny", "--set", "foo"], "SECTION.KEY")
    fails(["train", "--data", d, "--out", str(tmp_path / "r"), "--preset", "tiny", "--set", "train.batch_size=x"],
          "expected an integer")
    fails(["train", "--data", d, "--out", str(garbage.parent), "--resume"],
          "checkpoint.pt is not a BitTTS training checkpoint \\(torch.load cannot read it")
    fails(["train", "--data", d, "--out", str(tmp_path / "r"), "--preset", "tiny", "--steps", "0"], "--steps")
    fails(["prepare", "--out", f, "--sentences", "2"], "--out .*file: exists and is not a directory")
    fails(["prepare", "--out", str(tmp_path / "p"), "--sentences", "0"], "--sentences must be >= 1")
    fails(["prepare", "--out", str(tmp_path / "p"), "--ljspeech", str(tmp_path / "nope")], "not a directory")
    fails(["prepare", "--out", str(tmp_path / "p"), "--workers", "0"], "--workers 0: expected 1 to")
    fails(["prepare", "--out", str(tmp_path / "p"), "--val-fraction", "2"], "--val-fraction 2.0: expected a share")
    fails(["prepare", "--out", "/proc/no/such", "--sentences", "2"], "cannot create directory")
    fails(["export", str(garbage.parent), "-o", str(tmp_path / "m.safetensors")], "not a BitTTS training checkpoint")
    fails(["export", str(garbage.parent), "-o", d], "is a directory; give a file path, e.g. -o .*model.safetensors")


@needs_model
def test_synthesize_bad_input(tmp_path):
    (tmp_path / "d").mkdir()
    d = str(tmp_path / "d")
    base = ["synthesize", "--model", str(MODEL)]
    fails([*base, "--text", "hi", "-o", d], "is a directory; give a file path")
    fails([*base, "--text", "hi", "-o", "/"], "-o /: is a directory")
    fails([*base, "--text", "hi", "-o", str(tmp_path / ("a" * 260 + ".wav"))], "more than the 255")
    fails([*base, "--text-file", d, "-o", str(tmp_path / "out")], "is a directory: give a text file")
    fails([*base, "--text", "hi", "-o", str(tmp_path / "x.wav"), "--threads", "100000"], "--threads 100000: expected")
    fails([*base, "--text", "hi", "-o", str(tmp_path / "x.wav"), "--threads", "0"], "--threads 0")
    fails([*base, "--text", "hi", "-o", str(tmp_path / "x.wav"), "--duration-scale", "1e9"], "--duration-scale")
    fails([*base, "--text", " \n ", "-o", str(tmp_path / "x.wav")], "--text is empty")
    fails([*base, "--text", "hi", "-o", str(tmp_path / "x.mp3")], "-o .*x.mp3: bittts writes WAV only, not .mp3")
    fails([*base, "--text", "hi", "-o", str(tmp_path / "x.FLAC")], "WAV only, not .FLAC")
    (tmp_path / "lines.txt").write_text("hi\n")
    fails([*base, "--text-file", str(tmp_path / "lines.txt"), "-o", str(tmp_path / "out.ogg")], "WAV only, not .ogg")
    fails(["synthesize", "--model", d, "--text", "hi", "-o", str(tmp_path / "x.wav")], "is a directory, not a file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\xff" * 4000)
    fails(["synthesize", "--model", str(garbage), "--text", "hi", "-o", str(tmp_path / "x.wav")],
          "header length .* exceeds the .*-byte limit")
    escape = fails(["synthesize", "--model", str(tmp_path / "red\x1b[31m.safetensors"), "--text", "hi", "-o",
                    str(tmp_path / "x.wav")], "not found")
    assert "\x1b" not in escape and "red\\x1b[31m" in escape  # a terminal escape in a name is shown, not run
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    fails(["synthesize", "--model", str(fifo), "--text", "hi", "-o", str(tmp_path / "x.wav")], "named pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "garbage.pt", "lines.txt", "pipe.safetensors"]


@needs_model
def test_long_output_names_and_missing_directories_work(tmp_path):
    """A 255-byte file name (the temp file's name is shortened) and a missing output directory (created)."""
    out = tmp_path / "new" / "dir" / ("a" * 251 + ".wav")
    assert main(["synthesize", "--model", str(MODEL), "--text", "Hi.", "-o", str(out), "--threads", "1"]) == 0
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_commands_exit_with_one_line_and_no_signal(tmp_path):
    """As a process: exit status 1, one line on stderr, no traceback (--threads 100000 used to segfault)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cases = [(["synthesize", "--text", "hi", "-o", str(tmp_path / "x.wav"), "--threads", "100000"], "")]
    if MODEL.is_file():  # standard input that is not UTF-8
        cases.append((["synthesize", "--output-raw"], "Hello \udcff there."))
    for argv, stdin in cases:
        out = subprocess.run([sys.executable, "-m", "bittts.cli", *argv], capture_output=True, text=True,
                             timeout=120, env=env, input=stdin, errors="surrogateescape")
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert len(cases) == 1 or "standard input is not UTF-8 text (byte 6)" in out.stderr


# --- 10. bounded reads -------------------------------------------------------------------------------------------


def test_text_files_are_read_with_bounded_memory(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="line 1 is longer than"):
        read_sentences("/dev/zero")
    big = tmp_path / "big.txt"
    line = b"A short sentence.\n"
    big.write_bytes(line * (MAX_TEXT_BYTES // len(line) + 1))
    with pytest.raises(ValueError, match="is larger than 10,000,000 bytes"):
        read_sentences(big)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match="line 2 is not UTF-8"):
        read_sentences(binary)
    long_line = tmp_path / "long.txt"
    long_line.write_text("word " * (MAX_SENTENCE_CHARS // 4) + "\n")  # within the bytes read per line
    with pytest.raises(ValueError, match=f"line 1 has {5 * (MAX_SENTENCE_CHARS // 4) - 1:,} characters, more than "
                                         f"the {MAX_SENTENCE_CHARS:,}"):
        read_sentences(long_line)
    long_line.write_text("word " * MAX_SENTENCE_CHARS + "\n")  # beyond them
    with pytest.raises(ValueError, match=f"line 1 is longer than {MAX_SENTENCE_CHARS:,} characters"):
        read_sentences(long_line)
    assert read_sentences(big, limit=2) == ["A short sentence."] * 2
    assert time.perf_counter() - start < 30


# --- 11. forged model files ---------------------------------------------------------------------------------------


def forge_model(path: Path, out: Path, key: str, edit) -> Path:
    """`path` with user metadata `key` (JSON) edited by `edit`, its CRC32 and the manifest's recomputed."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    value = json.loads(meta[key])
    edit(value)
    meta[key] = json.dumps(value)
    manifest = json.loads(meta["ternq.manifest"])
    manifest["metadata"][key] = f"{zlib.crc32(meta[key].encode()) & 0xFFFFFFFF:08x}"
    meta["ternq.manifest"] = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    meta["ternq.manifest_crc32"] = f"{zlib.crc32(meta['ternq.manifest'].encode()) & 0xFFFFFFFF:08x}"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    out.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    return out


@needs_model
@pytest.mark.parametrize("forgery", [
    ("bittts.config", lambda c: c["acoustic"].update(enc_layers=100_000), "acoustic.enc_layers = 100000 is outside"),
    ("bittts.config", lambda c: c["acoustic"].update(enc_layers=10_000_000), "enc_layers = 10000000 is outside"),
    ("bittts.config", lambda c: c["acoustic"].update(enc_layers=5), "enc_layers = 5, but the file holds 4"),
    ("bittts.config", lambda c: c["vocoder"].update(resblock_kernels=[3, 7], resblock_dilations=[[1], [1]]),
     "resblock_kernels\\) x upsampling stages = 8, but the file holds 12"),
    ("bittts.config", lambda c: c["acoustic"].update(n_symbols=5000), "n_symbols x enc_channels = 5000 x"),
    ("bittts.config", lambda c: c["vocoder"].update(initial_channels=2**40), "initial_channels"),
    ("bittts.config", lambda c: c["vocoder"].update(resblock_dilations=[[1] * 1000]), "resblock_dilations"),
    ("bittts.audio", lambda a: a.update(sample_rate=0), "sample_rate 0 is not"),
    ("bittts.audio", lambda a: a.update(sample_rate=-16000), "sample_rate -16000"),
    ("bittts.audio", lambda a: a.update(sample_rate=1e30), "sample_rate 1e\\+30"),
    ("bittts.audio", lambda a: a.update(hop=255), "hop 255"),
    ("bittts.phonemizer", lambda p: p.update(voice="--help"), "voice '--help' is not an espeak-ng voice"),
    ("bittts.symbols", lambda s: s.append(7), "bittts.symbols"),
], ids=lambda f: "-".join(str(x) for x in f[:1]) if isinstance(f, tuple) else "")
def test_forged_model_metadata_is_refused_before_building(tmp_path, forgery):
    key, edit, match = forgery
    forged = forge_model(MODEL, tmp_path / "forged.safetensors", key, edit)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        read_model_metadata(forged)
    fails(["synthesize", "--model", str(forged), "--text", "hi", "-o", str(tmp_path / "x.wav")], match)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "x.wav").exists()


@needs_model
@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="needs espeak-ng")
def test_an_unknown_phonemizer_voice_is_one_line(tmp_path):
    forged = forge_model(MODEL, tmp_path / "forged.safetensors", "bittts.phonemizer",
                         lambda p: p.update(voice="xx-no-such-voice"))
    fails(["synthesize", "--model", str(forged), "--text", "hi", "-o", str(tmp_path / "x.wav")],
          "espeak-ng cannot phonemize with voice 'xx-no-such-voice'.*espeak-ng --voices")


# --- 12. resumed training logs ---------------------------------------------------------------------------------------


def test_truncate_metrics_keeps_increasing_steps_up_to_the_resumed_one(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30, 40)) + '{"step": 5')
    truncate_metrics(log, 20)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [10, 20]
    log.write_text('{"step": 10}\n{"step": 10}\n{"step": 20}\n')
    truncate_metrics(log, 30)
    assert log.read_text() == '{"step": 10}\n'


def test_a_resumed_run_logs_each_step_once(tmp_path, one_thread):
    """A run killed after logging steps past its last checkpoint redoes them: the log holds each step once."""
    cfg = tiny("train.log_every=1", "train.image_every=0")
    data = SyntheticTTS(4)
    torch.manual_seed(0)
    train(cfg, tmp_path, dataset=data, steps=2, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # logged by the killed run after its checkpoint at step 2
        f.write(json.dumps({"step": 3, "loss_g": 0.0}) + "\n" + json.dumps({"step": 4, "loss_g": 0.0}) + "\n")
    train(cfg, tmp_path, dataset=data, steps=4, resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_atomic_write_removes_the_temp_files_of_killed_writers(tmp_path):
    """A temp file of the same target left by a process that no longer exists goes on the next write; a live
    writer's (this process' parent) and another target's stay."""
    from ternq.atomic import atomic_write

    def _temp_prefix(path: Path) -> str:  # ternq.atomic's naming: .<name>.<crc32 of the name>.<pid>.<random>.tmp
        return f".{path.name}.{zlib.crc32(path.name.encode()):08x}."

    target = tmp_path / "out.wav"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"{_temp_prefix(target)}{dead}.0123abcd.tmp"
    live = tmp_path / f"{_temp_prefix(target)}{os.getppid()}.0123abcd.tmp"
    other = tmp_path / f"{_temp_prefix(tmp_path / 'other.wav')}{dead}.0123abcd.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    atomic_write(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


# --- 11. output paths: devices, FIFOs and permissions are kept (ternq.atomic) ------------------------------------


def _null_device(tmp_path: Path) -> str:
    """A character device that discards writes and that a broken writer may replace without harm: as root a
    private node of /dev/null's numbers (root could replace the machine's /dev/null), else /dev/null itself."""
    if os.geteuid() != 0:
        return os.devnull
    node = tmp_path / "null"
    rdev = os.stat(os.devnull).st_rdev
    try:
        os.mknod(node, 0o20666, os.makedev(os.major(rdev), os.minor(rdev)))
        node.write_bytes(b"x")
    except OSError as e:
        pytest.skip(f"as root, only a private device node is safe to write, and none can be made here ({e})")
    return str(node)


def _bittts(argv: list[str], fifo: Path | None = None) -> tuple[int, bytes, str]:
    """Run `bittts ARGV` as a process; with `fifo`, read everything it writes there. (exit status, bytes read,
    stderr)"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "bittts.cli", *argv], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=env, text=True)
    got = b""
    try:
        if fifo is not None:
            import select

            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the writer's open never waits for a reader
            chunks = []
            try:
                while True:
                    try:
                        data = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        select.select([fd], [], [], 0.1)
                        continue
                    if data:
                        chunks.append(data)
                    elif proc.poll() is not None:
                        break
                    else:
                        select.select([], [], [], 0.01)
            finally:
                os.close(fd)
            got = b"".join(chunks)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, got, err


@needs_model
def test_synthesize_writes_through_a_fifo_and_a_null_device(tmp_path):
    """`-o FIFO` feeds the FIFO's reader one whole WAV (it cannot seek, so it is spooled like standard output);
    `-o /dev/null` discards: both stay what they are (as root the old code replaced the machine's /dev/null)."""
    import wave

    fifo = tmp_path / "speech"
    os.mkfifo(fifo)
    rc, got, err = _bittts(["synthesize", "--model", str(MODEL), "--text", "Hi.", "-o", str(fifo), "--threads",
                            "1"], fifo)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    with wave.open(io.BytesIO(got)) as w:
        assert w.getnframes() > 1000 and w.getframerate() == 16000
    null = _null_device(tmp_path)
    before = os.stat(null)
    assert main(["synthesize", "--model", str(MODEL), "--text", "Hi.", "-o", null, "--threads", "1"]) == 0
    after = os.stat(null)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["speech", *(["null"] if null != os.devnull else [])])


def test_export_writes_through_a_fifo_and_keeps_a_files_mode(tmp_path, one_thread):
    import ternq

    torch.manual_seed(0)
    from bittts.data.text import SYMBOLS

    cfg = tiny()
    cfg.acoustic.n_symbols = len(SYMBOLS)  # the text model's symbol table: an exportable model
    train(cfg, tmp_path / "run", dataset=SyntheticTTS(4), steps=1, progress=False)
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    rc, got, err = _bittts(["export", str(tmp_path / "run"), "-o", str(fifo)], fifo)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert ternq.read_metadata(got)["bittts.format"]
    private = tmp_path / "private.safetensors"
    private.write_bytes(b"old")
    private.chmod(0o600)
    assert main(["export", str(tmp_path / "run"), "-o", str(private)]) == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and ternq.read_metadata(private)["bittts.format"]


def test_a_written_wav_keeps_the_files_mode(tmp_path):
    from bittts.data.audio import write_wav

    out = tmp_path / "out.wav"
    out.write_bytes(b"old")
    out.chmod(0o640)
    write_wav(out, torch.zeros(160))
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.stat().st_size > 44


def test_an_output_that_is_a_socket_is_refused(tmp_path):
    import socket

    sock_path = tmp_path / "out.wav"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        fails(["synthesize", "--model", str(MODEL), "--text", "hi", "-o", str(sock_path)], "is a socket; give a file")
        fails(["export", str(tmp_path), "-o", str(sock_path)], "is a socket; give a file")
    finally:
        sock.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
