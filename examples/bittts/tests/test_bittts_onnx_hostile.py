"""Crafted ONNX voices (`bittts.synthesis.onnx_voice`): a `.onnx` whose `.onnx.json` matches it (the SHA-256 is
integrity, not trust) and that tries to read other files, breaks the graph's contract or fails inside
onnxruntime; crafted `.onnx.json` sidecars. Each is refused with an error naming the file, never spoken."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from bittts.synthesis.onnx_voice import OnnxSynthesizer, external_tensor
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F, I64 = TensorProto.FLOAT, TensorProto.INT64
SECRET = b"SECRET-of-the-working-directory"
SIZE = len(SECRET)


def info(name, kind, shape):
    return helper.make_tensor_value_info(name, kind, shape)


INPUTS = [info("ids", I64, [1, "T"]), info("duration_scale", F, []), info("max_frames", I64, [])]
OUTPUTS = [info("wav", F, ["S"]), info("frames", I64, [])]


def const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def constant(output, value):
    return helper.make_node("Constant", [], [output], value=const(output + "_value", value))


def silence(samples=256, frames=1):
    """Nodes of a graph that gives `samples` zeros and says it made `frames` frames."""
    return [constant("shape", np.array([samples], np.int64)),
            helper.make_node("ConstantOfShape", ["shape"], ["wav"], value=const("zero", np.zeros(1, np.float32))),
            constant("frames", np.int64(frames))]


def model_bytes(nodes, initializers=(), inputs=INPUTS, outputs=OUTPUTS, sparse=()):
    graph = helper.make_graph(nodes, "voice", inputs, outputs, initializer=list(initializers),
                              sparse_initializer=list(sparse))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def write_voice(directory, data, **config):
    """`data` as VOICE.onnx with a sidecar that describes it (its SHA-256 matches)."""
    path = directory / "voice.onnx"
    path.write_bytes(data)
    sidecar = {"format": "bittts-onnx", "version": 1,
               "onnx": {"file": "voice.onnx", "sha256": hashlib.sha256(data).hexdigest(), "opset": 18},
               "audio": {"sample_rate": 16000, "hop": 256}, "symbols": list("abcdefgh"), "n_symbols": 8,
               "phonemizer": {"voice": "en-us"}} | config
    (directory / "voice.onnx.json").write_text(json.dumps(sidecar))
    return path


def external(name="W", location="secret.txt", size=SIZE):
    """A uint8 tensor whose values onnxruntime reads from `location` (ONNX external data)."""
    t = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[size], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("length", str(size))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def speaking(tensor):
    """Nodes that speak `tensor` (the secret as samples) and say one frame."""
    return [helper.make_node("Cast", [tensor], ["wav"], to=F), constant("frames", np.int64(1))]


def leaks():
    """Models that read secret.txt of the working directory: as an initializer, a Constant node's value, a
    sparse initializer's values, an initializer of an If branch."""
    values = TensorProto()
    values.CopyFrom(external("S_values"))
    indices = const("S_indices", np.arange(len(SECRET), dtype=np.int64))
    sparse = helper.make_sparse_tensor(values, indices, [len(SECRET)])
    branch = helper.make_graph([helper.make_node("Identity", ["W"], ["out"])], "branch", [],
                               [info("out", TensorProto.UINT8, [len(SECRET)])], initializer=[external()])
    condition = [constant("yes", np.array(True)),
                 helper.make_node("If", ["yes"], ["leak"], then_branch=branch, else_branch=branch)]
    return {"initializer": model_bytes(speaking("W"), [external()]),
            "Constant node": model_bytes([helper.make_node("Constant", [], ["W"], value=external("C")),
                                          *speaking("W")]),
            "sparse initializer": model_bytes(speaking("S"), sparse=[sparse]),
            "If branch": model_bytes([*condition, *speaking("leak")])}


@pytest.mark.parametrize("where", list(leaks()))
def test_a_voice_whose_tensors_live_in_other_files_is_refused(where, tmp_path, monkeypatch):
    # onnxruntime reads a relative `location` from the working directory for a model given as bytes: before,
    # the initializer's voice spoke the secret's bytes as its samples
    (tmp_path / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    model = write_voice(tmp_path, leaks()[where])
    with pytest.raises(ValueError, match=r"voice.onnx: tensor '.*' keeps its data in another file"):
        OnnxSynthesizer(model, threads=1)


def test_external_tensor_names_the_tensor():
    names = {"initializer": "W", "Constant node": "C", "sparse initializer": "S_values", "If branch": "W"}
    assert {where: external_tensor(data) for where, data in leaks().items()} == names
    assert external_tensor(model_bytes(silence())) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.sampled_from(list(leaks().values())).flatmap(
    lambda data: st.integers(0, len(data)).map(lambda n: data[:n])))
def test_external_tensor_reads_any_bytes(data):
    """Truncated models and noise: a name, None, or ValueError; never another exception or a hang."""
    try:
        found = external_tensor(data)
    except ValueError as e:
        assert str(e).startswith("not an ONNX model")
    else:
        assert found is None or isinstance(found, str)


def renamed(outputs=OUTPUTS, inputs=INPUTS, nodes=None):
    return model_bytes(nodes or silence(), inputs=inputs, outputs=outputs)


@pytest.mark.parametrize("data, what", [
    (renamed(inputs=[info("ids", F, [1, "T"]), *INPUTS[1:]]), "'ids' is a tensor.float."),
    (renamed(outputs=[info("wav", I64, ["S"]), OUTPUTS[1]],
             nodes=[constant("wav", np.zeros(256, np.int64)), constant("frames", np.int64(1))]), "'wav' is a tensor.int64."),
    (renamed(outputs=[info("wav", F, None), OUTPUTS[1]],
             nodes=[constant("wav", np.zeros((2, 256), np.float32)), constant("frames", np.int64(1))]),
     r"'wav' is a tensor.float. of shape \[2, 256\]"),
    (renamed(outputs=[OUTPUTS[0], info("frames", I64, None)],
             nodes=[*silence()[:2], constant("frames", np.array([1, 2], np.int64))]), r"'frames' .* shape \[2\]"),
    (renamed(outputs=[info("wav", TensorProto.STRING, None), OUTPUTS[1]],
             nodes=[helper.make_node("Constant", [], ["wav"],
                                     value=helper.make_tensor("s", TensorProto.STRING, [1], [b"x"])),
                    constant("frames", np.int64(1))]), "'wav' is a tensor.string."),
], ids=["ids float", "wav int64", "wav 2-D", "frames a vector", "wav strings"])
def test_a_graph_with_other_types_is_refused_at_load(data, what, tmp_path):
    # before, each loaded and spoke (the strings and the 2-D array as "audio"), or failed inside numpy
    with pytest.raises(ValueError, match=f"voice.onnx: the graph's {what}.*not a BitTTS voice's"):
        OnnxSynthesizer(write_voice(tmp_path, data), threads=1)


@pytest.mark.parametrize("nodes, message", [
    (silence(samples=100_000, frames=1), r"wav output \(float32 of shape \(100000,\)\) is not 1 frames of 256"),
    (silence(frames=-5), "frames output is not a non-negative int64 scalar"),
    ([*silence()[:1], helper.make_node("ConstantOfShape", ["shape"], ["wav"],
                                       value=const("nan", np.full(1, np.nan, np.float32))),
      constant("frames", np.int64(1))], "samples that are not finite"),
], ids=["frames understated", "frames negative", "NaN samples"])
def test_a_graph_that_breaks_its_contract_is_refused_at_run(nodes, message, tmp_path):
    # before, each was spoken: 100,000 samples past the frames the bound was checked on, NaN as PCM noise
    voice = OnnxSynthesizer(write_voice(tmp_path, model_bytes(nodes)), threads=1)
    with pytest.raises(RuntimeError, match=f"voice.onnx: .*{message}"):
        voice.synthesize_ids([1, 2, 3])


def test_a_model_onnxruntime_cannot_load_or_run_names_the_voice(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    with pytest.raises(ValueError, match="voice.onnx: not an ONNX model"):
        OnnxSynthesizer(write_voice(garbage, b"\x0f" * 64), threads=1)
    ort_format = tmp_path / "ort"  # onnxruntime detects its own format by these bytes, whatever the name
    ort_format.mkdir()
    with pytest.raises(ValueError, match="voice.onnx: an onnxruntime-format model"):
        OnnxSynthesizer(write_voice(ort_format, b"\x0a\x40\x00\x00ORTM" + bytes(64)), threads=1)
    empty = tmp_path / "empty"  # parses (no field), and onnxruntime refuses it: its error, as a ValueError
    empty.mkdir()
    with pytest.raises(ValueError, match="voice.onnx: onnxruntime cannot load this model"):
        OnnxSynthesizer(write_voice(empty, b""), threads=1)
    # the sidecar claims 8 symbols; the graph's table has 2 rows: onnxruntime fails inside the run
    table = const("table", np.zeros((2, 256), np.float32))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["g"], axis=0),
             constant("flat", np.array([-1], np.int64)), helper.make_node("Reshape", ["g", "flat"], ["wav"]),
             constant("frames", np.int64(1))]
    gather = model_bytes(nodes, [table], outputs=[info("wav", F, None), OUTPUTS[1]])
    voice = OnnxSynthesizer(write_voice(tmp_path, gather), threads=1)
    with pytest.raises(RuntimeError, match="voice.onnx: onnxruntime failed to run the voice"):
        voice.synthesize_ids([1, 7])


@pytest.mark.parametrize("text, what", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "bittts-onnx", "version": 1, "n_symbols": ' + "9" * 5000 + "}", "digits"),
], ids=["nesting", "huge integer"])
def test_a_crafted_sidecar_is_a_value_error_naming_it(text, what, tmp_path):
    # before: RecursionError, and a ValueError of Python's integer limit that named no file
    model = write_voice(tmp_path, model_bytes(silence()))
    (tmp_path / "voice.onnx.json").write_text(text)
    with pytest.raises(ValueError, match=f"voice.onnx.json: .*{what}"):
        OnnxSynthesizer(model, threads=1)
