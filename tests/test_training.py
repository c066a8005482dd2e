"""Short QAT runs: a model converted with ternary QAT learns a regression, and non-finite losses are caught.

The non-finite check lives in this loop on purpose: when to skip a step, how many to tolerate and how to agree
across processes is training-loop policy (the BitTTS example has its own), not quantization.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import ternq

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class NonFiniteLoss(AssertionError):
    pass


def train(model: nn.Module, teacher: nn.Module, shape: tuple[int, ...], steps: int, lr: float = 3e-3,
          amplitude: float = 1.0, poison: dict[int, float] | None = None) -> list[float]:
    """Fit `model` to ``amplitude * teacher(x)`` on fresh Gaussian batches; stop at the first non-finite loss.

    `poison` maps a step to a value written into the first element of that step's input batch.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(100)
    losses = []
    for step in range(steps):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            y = amplitude * teacher(x)
        if poison and step in poison:
            x.view(-1)[0] = poison[step]
        loss = nn.functional.mse_loss(model(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {step}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _codes(model: nn.Module) -> dict[str, Tensor]:
    return {name: m.weight_codes()[0].clone() for name, m in model.named_modules() if ternq.is_quantized(m)}


def _mlp() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, teacher


def test_ternary_mlp_learns_a_regression() -> None:
    """The paper recipe on every layer: layer-normed int8 inputs, per-tensor absmean ternary weights."""
    model, teacher = _mlp()
    model = ternq.quantize(model)
    assert all(ternq.is_quantized(model[i]) and model[i].qconfig == ternq.TernaryConfig() for i in (0, 2, 4))
    before = _codes(model)
    losses = train(model, teacher, (128, 16), steps=150)
    first, last = _mean(losses[:10]), _mean(losses[-10:])
    assert last < first / 3, (first, last)
    after = _codes(model)
    for name, codes in after.items():
        assert set(codes.unique().tolist()) == {-1, 0, 1}, name
        # the straight-through gradient reached the latent weights and moved codes (not just the biases)
        assert (codes != before[name]).float().mean() > 0.02, name


def test_ternary_conv_stack_learns_a_regression() -> None:
    """A conv stack; the first layer skips the input norm (4 raw channels would lose their scale and mean)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 16, 5, padding=2), nn.GELU(), nn.Conv1d(16, 16, 5, padding=2), nn.GELU(),
                          nn.Conv1d(16, 1, 5, padding=2))
    teacher = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.Tanh(), nn.Conv1d(8, 1, 3, padding=1))
    model = ternq.quantize(model, include=[ternq.Rule("0", ternq.TernaryConfig(input_norm=None)), "*"])
    assert model[0].qconfig.input_norm is None and model[2].qconfig.input_norm == "layernorm"
    before = _codes(model)
    losses = train(model, teacher, (32, 4, 32), steps=150, amplitude=3.0)
    first, last = _mean(losses[:10]), _mean(losses[-10:])
    assert last < first / 4, (first, last)
    with torch.no_grad():
        x = torch.randn(256, 4, 32, generator=torch.Generator().manual_seed(7))
        variance = (3.0 * teacher(x)).var().item()
    assert last < 0.3 * variance, (last, variance)  # far better than predicting the mean
    assert all((codes != before[name]).any() for name, codes in _codes(model).items())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_input_is_caught_at_its_step(value: float) -> None:
    """Quantizers must not hide a bad value: a NaN / inf input gives a non-finite loss at that very step."""
    model, teacher = _mlp()
    model = ternq.quantize(model)
    with pytest.raises(NonFiniteLoss, match="at step 3$"):
        train(model, teacher, (8, 16), steps=6, poison={3: value})


def test_non_finite_weight_is_caught() -> None:
    """A NaN latent weight poisons its ternary scale (mean|W|) and so every output, rather than being clipped away."""
    model, teacher = _mlp()
    model = ternq.quantize(model)
    with torch.no_grad():
        model[2]._parameters["weight"][0, 0] = math.nan  # the latent weight (model[2].weight reads its codes)
    with pytest.raises(NonFiniteLoss, match="nan at step 0"):
        train(model, teacher, (8, 16), steps=2)
