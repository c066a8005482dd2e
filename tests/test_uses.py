"""Properties of finding weights by use and quantizing them wherever used (`ternq.uses`), over random models
composed of the parts the zoo covers one at a time."""
from __future__ import annotations

import pytest
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


class Mixed(nn.Module):
    """Weights reaching a matmul through a scalar multiple, linalg.multi_dot, a parent reading a layer's weight,
    and an addmm whose added term (a bias) is no weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.w = nn.Parameter(torch.randn(D, D) * 0.3)
        self.c = nn.Parameter(torch.randn(D, D) * 0.3)
        self.d = nn.Parameter(torch.randn(D, D) * 0.3)
        self.b = nn.Parameter(torch.randn(1, D))
        self.m = nn.Parameter(torch.randn(D, D) * 0.3)

    def forward(self, x):
        h = self.fc(x) + torch.nn.functional.linear(x, 2 * self.fc.weight)
        h = torch.nn.functional.linear(h, self.w * 0.25) + torch.linalg.multi_dot([h, self.c, self.d])
        return torch.addmm(self.b, h, self.m)


def test_scalar_multiples_multi_dot_and_addends(tmp_path):
    x = torch.randn(3, D)
    for example in (None, x):
        torch.manual_seed(0)
        rows = {r.name: r for r in ternq.report(Mixed(), example_inputs=example).rows}
        assert set(rows) == {"fc.weight", "w", "c", "d", "m"}, rows  # b is added, not multiplied: no weight
        assert rows["fc.weight"].reason == "weights only where the model (linear) reads it"
        assert rows["m"].type == "torch.addmm" and rows["c"].reason.startswith("weights only: linalg_multi_dot")
    torch.manual_seed(0)
    model = ternq.quantize(Mixed(), example_inputs=x, strict=True).eval()
    assert float_uses(model, x) == []
    ternq.save_packed(model, tmp_path / "m.safetensors")
    torch.manual_seed(0)
    loaded = ternq.load_packed(tmp_path / "m.safetensors", Mixed().eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    report = ternq.report(loaded)  # a loaded model carries its record: the same weights, decisions and rules
    assert report.applied and {r.name: (r.decision, r.rule) for r in report.rows} == {
        k: ("ternary", "default") for k in ("fc.weight", "w", "c", "d", "m")}


def test_report_reasons_for_ties_lazy_modules_and_parametrized_layers():
    class TiedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, D)
            self.body = nn.Linear(D, D)

        def forward(self, ids):
            return torch.nn.functional.linear(self.body(self.emb(ids)), self.emb.weight)

    rows = {r.name: r for r in ternq.report(TiedHead(), example_inputs=torch.randint(0, 10, (2, 3))).rows}
    assert rows["emb.weight"].decision == "float"
    assert rows["emb.weight"].reason == "read by the model (linear) too, float there as well"
    with pytest.raises(ternq.ConversionError, match="run the model once"):
        ternq.quantize(nn.Sequential(nn.LazyLinear(4)))
    model = nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(D, D)))
    shared = nn.Linear(D, D)
    model.add_module("again", shared)
    model.add_module("twice", shared)  # one module under two names: no tie, and it ran
    rows = {r.name: r for r in ternq.report(model, example_inputs=torch.randn(2, D)).rows}
    assert rows["0.weight"].reason == "" and rows["again.weight"].reason == ""


def test_legacy_spectral_norm_packs_and_loads(tmp_path):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.utils.spectral_norm(nn.Conv1d(4, 8, 3)), nn.Conv1d(8, 2, 1))

    x = torch.randn(2, 4, 9)
    model = ternq.quantize(build(), example_inputs=x).eval()
    with torch.no_grad():
        qat = model(x)
    ternq.save_packed(model, tmp_path / "m.safetensors")
    loaded = ternq.load_packed(tmp_path / "m.safetensors", build().eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qat, atol=1e-4, rtol=1e-4)
