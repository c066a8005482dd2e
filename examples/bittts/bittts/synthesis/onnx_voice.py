"""A BitTTS voice exported to ONNX (`bittts export --format onnx`), spoken with onnxruntime and numpy only.

An ONNX voice is two files, as a Piper voice is: ``VOICE.onnx`` (the model) and ``VOICE.onnx.json`` (what the
front end needs). Nothing here imports torch or the ``ternq`` package, so an installation without torch speaks
(`OnnxSynthesizer`, or ``bittts synthesize --model VOICE.onnx``).

The graph (``ONNX_VERSION`` 1) is the whole synthesis in one run, with dynamic lengths:

    inputs   ids            int64 (1, T_text)   phoneme ids (the JSON's ``symbols``)
             duration_scale float32 ()          > 1 speaks slower
             max_frames     int64 ()            the most frames (vocoder hops) to synthesize
    outputs  wav            float32 (S,)        the waveform in [-1, 1], S = min(frames, max_frames) * hop
             frames         int64 ()            the frames the predicted durations sum to

Encoder and variance predictors give the durations; the length regulator repeats each phoneme's features by
its duration inside the graph (a cumulative sum and a gather: no loop, no data-dependent control flow), cut at
``max_frames`` so that the decoder and the vocoder never run past the bound (`bittts.limits`); the caller
refuses the utterance when ``frames`` exceeds it.

``VOICE.onnx.json`` (``ONNX_FORMAT``, version 1):

    format, version    "bittts-onnx", 1
    onnx               {"file": the ONNX file's name, "sha256": of its bytes (the pair is checked on load),
                        "opset": the ONNX opset}
    audio              {"sample_rate": 16000, "hop": 256}
    symbols            the symbol table: one phoneme character per id, as in the safetensors model
    n_symbols          the embedding's rows (ids must lie below)
    phonemizer         {"backend": "espeak-ng", "voice": "en-us", "normalizer": "bittts.data.text.normalize"}
    source             informative: the model it was exported from ({"file", "config", "training"})
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data import text
from ..extras import install_hint
from ..limits import LimitError
from .voice import PHONEMIZER_VOICE, SAMPLE_RATES, Voice

__all__ = ["ONNX_FORMAT", "ONNX_VERSION", "INPUTS", "OUTPUTS", "config_path", "read_onnx_config",
           "external_tensor", "OnnxSynthesizer"]

ONNX_FORMAT = "bittts-onnx"
ONNX_VERSION = 1
INPUTS = ("ids", "duration_scale", "max_frames")
OUTPUTS = ("wav", "frames")
_MAX_CONFIG_BYTES = 10_000_000  # a voice's JSON is ~10 kB; a bigger file is not one
_MAX_MODEL_BYTES = 2**31 - 1  # protobuf's limit on one message: a bigger file is not an ONNX model
# the graph's interface: onnxruntime's type of each input and output, and its rank
_INPUT_TYPES = {"ids": ("tensor(int64)", 2), "duration_scale": ("tensor(float)", 0), "max_frames": ("tensor(int64)", 0)}
_OUTPUT_TYPES = {"wav": ("tensor(float)", 1), "frames": ("tensor(int64)", 0)}


def config_path(model: str | os.PathLike[str]) -> Path:
    """Where the JSON of the ONNX voice `model` lives: beside it, ``VOICE.onnx.json`` (Piper's convention)."""
    return Path(os.fspath(model) + ".json")


def read_onnx_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked JSON of an ONNX voice (`config_path`); ValueError naming the field that is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an ONNX voice is two files, VOICE.onnx and VOICE.onnx.json, "
                                "written together by `bittts export MODEL.safetensors --format onnx -o VOICE.onnx`")
    with open(path, "rb") as f:  # read at most the bound (the file may grow after a stat)
        raw = f.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: more than {_MAX_CONFIG_BYTES:,} bytes is not a BitTTS voice config")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path}: not a BitTTS voice config (JSON nested too deeply)") from None
    except ValueError as e:  # not UTF-8, not JSON, or an integer past Python's 4,300 digits
        raise ValueError(f"{path}: not a JSON voice config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != ONNX_FORMAT:
        raise ValueError(f"{path} is not a BitTTS ONNX voice config (no \"format\": \"{ONNX_FORMAT}\")")
    if cfg.get("version") != ONNX_VERSION:
        raise ValueError(f"{path}: BitTTS ONNX voice version {cfg.get('version')!r}; this bittts reads version "
                         f"{ONNX_VERSION}: upgrade bittts, or export the voice again")
    try:
        _check(cfg)
    except ValueError as e:
        raise ValueError(f"{path}: invalid voice config: {e}") from None
    return cfg


_SECTIONS = (("onnx", dict, "an object"), ("audio", dict, "an object"), ("symbols", list, "an array"),
             ("n_symbols", int, "an integer"), ("phonemizer", dict, "an object"))


def _check(cfg: dict[str, Any]) -> None:
    for key, kind, what in _SECTIONS:
        if not isinstance(cfg.get(key), kind):
            raise ValueError(f"{key} must be {what}, not {json.dumps(cfg.get(key))[:40]}")
    onnx = cfg["onnx"]
    if not isinstance(onnx.get("sha256"), str) or len(onnx["sha256"]) != 64:
        raise ValueError("onnx.sha256 must be the 64 hex digits of the ONNX file's SHA-256")
    rate, hop = cfg["audio"].get("sample_rate"), cfg["audio"].get("hop")
    if type(rate) is not int or not SAMPLE_RATES[0] <= rate <= SAMPLE_RATES[1]:
        raise ValueError(f"audio.sample_rate {rate!r} is not an integer in {SAMPLE_RATES[0]}..{SAMPLE_RATES[1]} Hz")
    if type(hop) is not int or not 1 <= hop <= 4096:
        raise ValueError(f"audio.hop {hop!r} is not an integer in 1..4096")
    symbols, n = cfg["symbols"], cfg["n_symbols"]
    if type(n) is not int or not 2 <= n <= 100_000:
        raise ValueError(f"n_symbols {n!r} is not an integer in 2..100000")
    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols) or not 1 <= len(symbols) <= n:
        raise ValueError(f"symbols must be a list of 1 to n_symbols = {n} strings")
    voice = cfg["phonemizer"].get("voice", PHONEMIZER_VOICE)
    if not isinstance(voice, str) or not text.is_voice_name(voice):
        raise ValueError(f"phonemizer.voice {voice!r:.60} is not an espeak-ng voice name")


class OnnxSynthesizer(Voice):
    """An ONNX BitTTS voice on onnxruntime: text -> phonemes (espeak-ng) -> ids -> waveform (numpy float32).

    threads: onnxruntime's intra-op threads (None: its default, one per physical core). One session serves
    concurrent `synthesize` calls (onnxruntime's `run` is thread-safe)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 config: str | os.PathLike[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError("an ONNX voice runs on onnxruntime, which is not installed: pip install onnxruntime, "
                               "or " + install_hint("onnx")) from None
        self.path, self._threads = Path(path), threads
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX voice {os.fspath(path)!r} not found; export one with "
                                    "`bittts export MODEL.safetensors --format onnx -o VOICE.onnx`")
        self.config = read_onnx_config(config if config is not None else config_path(self.path))
        data = _read_model(self.path)
        if hashlib.sha256(data).hexdigest() != self.config["onnx"]["sha256"]:
            raise ValueError(f"{self.path} is not the ONNX file {config_path(self.path).name} describes (its SHA-256 "
                             "differs): keep the two files of one export together, or export the voice again")
        if data[4:8] == b"ORTM":  # onnxruntime would load it in its own format, which is not walked below
            raise ValueError(f"{self.path}: an onnxruntime-format model (.ort), not an ONNX file: export the voice "
                             "with `bittts export`")
        try:
            external = external_tensor(data)
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from None
        if external is not None:  # onnxruntime would read it from a file of the working directory
            raise ValueError(f"{self.path}: tensor {external!r:.80} keeps its data in another file (ONNX external "
                             "data); a BitTTS voice holds all of its tensors in its .onnx file: export it again")
        self.init_front_end(self.config["symbols"], self.config["phonemizer"],
                            self.config["audio"]["sample_rate"], self.config["audio"]["hop"])
        self.n_symbols: int = self.config["n_symbols"]
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors derive from Exception only
            raise ValueError(f"{self.path}: onnxruntime cannot load this model ({type(e).__name__}: {e})") from None
        self._check_interface()

    def _check_interface(self) -> None:
        """The graph's inputs and outputs are a BitTTS voice's: names, element types and (where the graph states
        them) ranks; ValueError naming the first that is not. onnxruntime gives an unknown rank as ``[]``, a
        scalar's shape, so ``[]`` passes (the outputs are checked again on each run)."""
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if sorted(names[0]) != sorted(INPUTS) or sorted(names[1]) != sorted(OUTPUTS):
            raise ValueError(f"{self.path}: the graph's inputs {names[0]} and outputs {names[1]} are not a BitTTS "
                             f"voice's ({list(INPUTS)} -> {list(OUTPUTS)}); export it with `bittts export`")
        for args, expected in ((self.session.get_inputs(), _INPUT_TYPES), (self.session.get_outputs(), _OUTPUT_TYPES)):
            for arg in args:
                kind, rank = expected[arg.name]
                if arg.type != kind or arg.shape and len(arg.shape) != rank:
                    raise ValueError(f"{self.path}: the graph's {arg.name!r} is a {arg.type} of shape {arg.shape}, "
                                     f"not a BitTTS voice's (a {kind} of rank {rank}); export it with `bittts export`")

    def threads(self) -> int | None:
        return self._threads

    def _run(self, ids: list[int], duration_scale: float, max_frames: int) -> np.ndarray:
        if max_frames < len(ids):  # every phoneme lasts a frame at least
            raise LimitError(f"{len(ids):,} phonemes last more than the {max_frames:,} frames asked for")
        feed = np.asarray([ids], dtype=np.int64)
        if int(feed.min()) < 0 or int(feed.max()) >= self.n_symbols:
            raise ValueError(f"phoneme ids must lie in [0, {self.n_symbols}); got values in [{int(feed.min())}, "
                             f"{int(feed.max())}]")
        try:
            wav, frames = self.session.run(list(OUTPUTS), {
                "ids": feed, "duration_scale": np.asarray(duration_scale, dtype=np.float32),
                "max_frames": np.asarray(max_frames, dtype=np.int64)})
        except Exception as e:  # onnxruntime's errors derive from Exception only
            raise RuntimeError(f"{self.path}: onnxruntime failed to run the voice ({type(e).__name__}: {e})") from None
        # the graph's contract (the module's docstring), checked: a crafted graph may say it made fewer frames
        # than it did, or give other shapes and types
        if not (isinstance(frames, np.ndarray) and frames.shape == () and frames.dtype == np.int64 and frames >= 0):
            raise RuntimeError(f"{self.path}: the graph's frames output is not a non-negative int64 scalar "
                               f"({_describe(frames)}): not a BitTTS voice")
        if int(frames) > max_frames:
            raise LimitError(f"{int(frames):,} frames of audio, more than the {max_frames:,} asked for")
        if not (isinstance(wav, np.ndarray) and wav.dtype == np.float32 and wav.shape == (int(frames) * self.hop,)):
            raise RuntimeError(f"{self.path}: the graph's wav output ({_describe(wav)}) is not {int(frames)} frames of "
                               f"{self.hop} float32 samples, as its frames output says: not a BitTTS voice")
        if not np.isfinite(wav).all():
            raise RuntimeError(f"{self.path}: the graph gave samples that are not finite numbers (NaN or infinity)")
        return wav


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} of shape {value.shape}"
    return type(value).__name__


def _read_model(path: Path) -> bytes:
    """The bytes of the ONNX file `path`, refused past protobuf's 2 GiB without reading further."""
    with open(path, "rb") as f:
        data = f.read(_MAX_MODEL_BYTES + 1)
    if len(data) > _MAX_MODEL_BYTES:
        raise ValueError(f"{path}: more than 2 GiB is not an ONNX model (protobuf's limit on one file)")
    return data


# Where a tensor can sit in an ONNX model (onnx.proto: message -> {field number: the message it holds}): the
# graph's initializers, a node attribute's tensors and subgraphs (If / Loop / Scan bodies), sparse tensors, model
# functions and training graphs
_HOLDS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14


def external_tensor(data: bytes) -> str | None:
    """The name of the first tensor of the serialized ONNX model `data` that keeps its values in another file
    (``data_location: EXTERNAL``, ``external_data`` entries), or None. onnxruntime reads such a tensor from the
    file its ``location`` names, relative to the working directory for a model given as bytes, so a crafted
    voice could read any file there into its weights (and speak it). Read from the protobuf wire format, so that
    neither the ``onnx`` package nor a parse of the whole model is needed; ValueError if `data` is not one."""
    view = memoryview(data)
    stack = [("model", 0, len(data))]
    while stack:
        kind, pos, end = stack.pop()
        name, external = "", False
        while pos < end:
            key, pos = _varint(view, pos, end)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = _varint(view, pos, end)
                external |= kind == "tensor" and number == _TENSOR_DATA_LOCATION and value != 0
            elif wire == 2:
                size, pos = _varint(view, pos, end)
                if size > end - pos:
                    raise ValueError("not an ONNX model (a field runs past the end of its message)")
                held = _HOLDS.get(kind, {}).get(number)
                if held is not None:
                    stack.append((held, pos, pos + size))
                elif kind == "tensor" and number == _TENSOR_NAME:
                    name = bytes(view[pos:pos + size]).decode("utf-8", "replace")
                external |= kind == "tensor" and number == _TENSOR_EXTERNAL_DATA
                pos += size
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                raise ValueError(f"not an ONNX model (protobuf wire type {wire})")
            if pos > end:
                raise ValueError("not an ONNX model (a field runs past the end of its message)")
        if external:
            return name
    return None


def _varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("not an ONNX model (a truncated or overlong varint)")
        byte = view[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
