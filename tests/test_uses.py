"""Properties of finding weights by use and quantizing them wherever used (`ternq.uses`), over random models
composed of the parts the zoo covers one at a time."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ternq
from ternq.uses import float_uses

D = 8


class MatmulParam(nn.Module):
    """A weight used by `@` through a transpose: no layer, a weight-only site."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, D) * 0.3)

    def forward(self, x):
        return x @ self.w.t()


class Experts(nn.Module):
    """Fused experts indexed per token group: a scale per expert."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, D, D) * 0.3)

    def forward(self, x):
        return torch.stack([torch.nn.functional.linear(x[..., i, :], self.w[i % 3]) for i in range(x.shape[-2])], -2)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(D, D, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class ConvTime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D, D, 3, padding=1)

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


PARTS = {"linear": lambda: nn.Linear(D, D), "matmul": MatmulParam, "experts": Experts, "attention": Attention,
         "gru": Recurrent, "conv": ConvTime, "tanh": nn.Tanh}


@settings(max_examples=12, deadline=None)
@given(parts=st.lists(st.sampled_from(sorted(PARTS)), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_every_weight_is_quantized_wherever_it_is_used(parts, seed, tmp_path_factory):
    """Any composition: every weight reaching a compute op has a quantized row, no compute op sees a float weight
    the report calls quantized (eval and train), and the packed model computes what the QAT model does."""
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(*(PARTS[p]() for p in parts))

    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed))
    model = build()
    if not any(p.dim() >= 2 for p in model.parameters()):
        return
    model = ternq.quantize(model, example_inputs=x, strict=True)
    report = ternq.report(model)
    assert all(r.decision == "ternary" for r in report.rows), str(report)
    assert {r.name for r in report.rows} == {k for k, p in model.named_parameters() if p.dim() >= 2}
    for mode in (model.eval, model.train):
        mode()
        assert float_uses(model, x) == []
    model.eval()
    path = tmp_path_factory.mktemp("packed") / "m.safetensors"
    ternq.save_packed(model, path)
    loaded = ternq.load_packed(path, build().eval())
    with torch.no_grad():
        qat, packed = model(x), loaded(x)
    close = (packed - qat).abs() <= 1e-4 + 1e-4 * qat.abs()  # the runtime's tolerance (ternq.runtime)
    assert close.float().mean() >= 0.99 and (packed - qat).abs().max() <= 0.01 * qat.abs().max() + 1e-6
