"""`ternq.export_onnx`: the ONNX graph computes what ternq's runtime computes, from the packed codes.

onnxruntime's output is compared with the packed ternq model's (`ternq.load_packed`), within the runtime's
tolerance (`ternq.runtime`): float32 rounding of the sums, ``1e-5 * (|x_q| @ |W_q|)`` per layer, which after a
few layers we bound by ``1e-4`` of the output's largest magnitude; and an activation code may differ by one step
where a normalized value lies within rounding of a rounding boundary (onnxruntime's LayerNormalization sums in
its own order, as the native kernels do), which moves a few outputs further: at most 1% of them may exceed the
bound, none by more than 5% of the largest magnitude.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import ternq

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


def run_onnx(path: Path, *inputs: Tensor) -> Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


def assert_matches_runtime(y: Tensor, ref: Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if ref.numel() == 0:
        return
    scale = float(ref.abs().max())
    err = (y - ref).abs()
    beyond = err > 1e-4 * scale + 1e-6
    assert float(beyond.float().mean()) <= 0.01, f"{int(beyond.sum())} of {err.numel()} outputs beyond 1e-4"
    assert float(err.max()) <= 0.05 * scale + 1e-6, f"max error {float(err.max())} of max |y| {scale}"


def conv_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(),
                         nn.ConvTranspose1d(32, 24, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(24, 20, 3, groups=4))


class LinearHead(nn.Module):
    """A conv stack followed by a Linear over the channels: the three layer kinds of a vocoder."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = conv_stack()
        self.proj = nn.Linear(20, 12)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x).transpose(1, 2))


def test_qat_and_packed_export_match_the_runtime_with_dynamic_axes(tmp_path: Path) -> None:
    """A QAT model and its packed form export; onnxruntime runs other batch sizes and lengths than the example's
    and matches the packed ternq model; the file is the size of the packed one plus the graph."""
    qat = ternq.quantize(LinearHead(), include=["*"])
    ternq.save_packed(qat, tmp_path / "m.safetensors")
    packed = ternq.load_packed(tmp_path / "m.safetensors", LinearHead())
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    x = torch.randn(2, 16, 30)
    for name, model in (("qat", qat), ("packed", packed)):
        path = ternq.export_onnx(model, (x,), tmp_path / f"{name}.onnx", input_names=["x"],
                                 dynamic_axes={"x": {0: "batch", 2: "time"}})
        for shape in ((2, 16, 30), (3, 16, 47), (1, 16, 8)):
            x2 = torch.randn(*shape)
            with torch.no_grad():
                ref = packed(x2)
            assert_matches_runtime(run_onnx(path, x2), ref)
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in before.items())
    assert qat.training and any(ternq.is_quantized(m) for m in qat.modules())  # the model is unchanged
    assert path.stat().st_size < (tmp_path / "m.safetensors").stat().st_size + 32_000
