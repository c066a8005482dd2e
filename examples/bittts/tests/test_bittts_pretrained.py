"""The shipped models: present, intact, the promised sizes, described by their model card, and they speak."""
from __future__ import annotations

import pytest
import torch
from bittts.synthesis.synthesizer import DEFAULT_MODEL, FP32_MODEL, Synthesizer, shipped_model

from ternq.cli import verify_file

pytestmark = pytest.mark.usefixtures("one_thread")

TERNARY, FP32 = shipped_model(DEFAULT_MODEL), shipped_model(FP32_MODEL)
CARD = TERNARY.parent / "README.md"


def test_both_models_and_the_card_are_shipped():
    for path in (TERNARY, FP32, CARD):
        assert path.is_file(), f"{path} is missing: it is part of the package (see docs/bittts-results.md)"


def test_ternary_model_meets_the_size_targets():
    ternary, fp32 = TERNARY.stat().st_size, FP32.stat().st_size
    assert ternary <= 4.39e6  # the paper's 1.58-bit model
    assert 1 - ternary / fp32 >= 0.83  # the paper's reduction


def test_model_card_states_the_shipped_files_byte_counts():
    """Replacing a model without updating its card fails here."""
    card = CARD.read_text()
    for path in (TERNARY, FP32):
        assert f"{path.stat().st_size:,}" in card, f"the model card does not state {path.name}'s size"


@pytest.mark.parametrize("path, scheme", [(TERNARY, "ternary"), (FP32, "none")])
def test_shipped_model_is_intact_and_speaks(path, scheme):
    verify_file(path)  # every CRC and packed code checked
    synth = Synthesizer(path)
    assert synth.cfg.quant.scheme == scheme and (scheme == "none" or synth.cfg.quant.scope == "all")
    out = synth.synthesize("The birch canoe slid on the smooth planks.")
    assert out.sample_rate == 16000 and 1.0 < out.duration < 10.0
    assert torch.isfinite(out.wav).all() and out.wav.abs().max() > 0.05


def test_synthesizer_defaults_to_the_ternary_model():
    assert Synthesizer().path == TERNARY
