"""BitTTS model: configs and presets, forward/infer contracts, weight-norm folding, quantization presets."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bittts.acoustic import MDNDurationPredictor
from bittts.config import (
    PRESETS,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    load_preset,
    save_config,
)
from bittts.data import collate
from bittts.discriminators import Discriminators
from bittts.losses import bin_loss_weight, discriminator_loss, generator_loss
from bittts.model import BitTTS, build_model, parameter_counts
from bittts_synthetic import N_SYMBOLS, SyntheticTTS
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**quant):
    cfg = load_preset("tiny")
    cfg.acoustic.n_symbols = N_SYMBOLS
    cfg = apply_overrides(cfg, [f"quant.{k}={v!r}" if isinstance(v, str) else f"quant.{k}={v}"
                                for k, v in quant.items()])
    return cfg


@pytest.fixture(scope="module")
def batch():
    return collate([SyntheticTTS(3)[i] for i in range(3)])


# --------------------------------------------------------------------------------------------- config


def test_every_preset_loads_and_round_trips_through_toml(tmp_path):
    for name in PRESETS:
        cfg = load_preset(name)
        assert cfg.name == name
        save_config(cfg, tmp_path / f"{name}.toml")
        assert load_config(tmp_path / f"{name}.toml") == cfg
    assert load_preset("fp32").quant.scheme == "none"
    assert (load_preset("acoustic").quant.scheme, load_preset("acoustic").quant.scope) == ("ternary", "acoustic")
    assert (load_preset("all").quant.scheme, load_preset("all").quant.scope) == ("ternary", "all")
    assert (load_preset("4bit").quant.scheme, load_preset("4bit").quant.bits) == ("kbit", 4)
    for name in ("acoustic", "all", "4bit"):  # `base = "fp32"`: same architecture, other quantization
        # ... and no dropout before the quantized predictor layers (docs/quantizers.md explains why)
        assert load_preset(name).acoustic.variance_dropout == 0.0 < load_preset("fp32").acoustic.variance_dropout
        assert replace(load_preset(name).acoustic, variance_dropout=0.5) == load_preset("fp32").acoustic
        assert load_preset(name).discriminator == load_preset("fp32").discriminator
    custom = tmp_path / "custom.toml"
    custom.write_text('base = "tiny"\n[train]\nbatch_size = 3\n')
    assert load_config(custom).train.batch_size == 3
    assert load_config(custom).acoustic == load_preset("tiny").acoustic
    paper = load_preset("acoustic")
    assert (paper.acoustic.enc_channels, paper.acoustic.enc_layers, paper.acoustic.enc_kernel) == (256, 4, 5)
    assert (paper.acoustic.dec_channels, paper.acoustic.dec_layers, paper.acoustic.dec_kernel) == (192, 4, 5)
    assert paper.vocoder.initial_channels == 128 and paper.vocoder.upsample_rates == (8, 8, 2, 2)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        load_preset("big")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['enc_chanels'\] in \[acoustic\]"):
        config_from_dict({"acoustic": {"enc_chanels": 3}})
    with pytest.raises(ValueError, match="unknown config section"):
        config_from_dict({"acustic": {}})
    with pytest.raises(ValueError, match="train.batch_size: expected an integer"):
        config_from_dict({"train": {"batch_size": "8"}})
    with pytest.raises(ValueError, match="quant.scheme='binary'"):
        apply_overrides(load_preset("tiny"), ["quant.scheme=binary"])
    with pytest.raises(ValueError, match="expected SECTION.KEY=VALUE"):
        apply_overrides(load_preset("tiny"), ["batch_size=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ValueError, match="n_symbols"):
        BitTTS(load_preset("tiny"))


def test_overrides_parse_toml_values():
    cfg = apply_overrides(load_preset("tiny"), ["train.batch_size=4", "train.lr=3e-4", "quant.scheme=none",
                                                "vocoder.resblock_dilations=[[1, 2]]"])
    assert (cfg.train.batch_size, cfg.train.lr, cfg.quant.scheme) == (4, 3e-4, "none")
    assert cfg.vocoder.resblock_dilations == ((1, 2),)
    assert "batch_size = 4" in dump_config(cfg)


# ------------------------------------------------------------------------------------------ model


def test_forward_returns_aligned_segments_and_finite_losses(batch):
    torch.manual_seed(0)
    cfg = tiny_config(scheme="none")
    model = BitTTS(cfg)
    out = model(batch)
    seg = cfg.train.segment_frames
    b = batch["phonemes"].shape[0]
    assert out["wav_hat"].shape == out["wav"].shape == (b, 1, seg * 256)
    assert out["hidden"].shape == (b, cfg.acoustic.dec_channels, batch["mel"].shape[2])
    for i, start in enumerate(out["segment_starts"].tolist()):
        assert 0 <= start <= max(int(batch["mel_lengths"][i]) - seg, 0)
        real = batch["wav"][i, 0, start * 256:(start + seg) * 256]
        torch.testing.assert_close(out["wav"][i, 0, : real.shape[0]], real)
    assert (out["durations"].sum(1) == batch["mel_lengths"]).all()
    for key in ("loss_forward_sum", "loss_bin", "loss_dur", "loss_pitch", "loss_energy"):
        assert torch.isfinite(out[key]), key
    disc = Discriminators(cfg.discriminator)
    scores, fmaps = disc(out["wav_hat"])
    total, parts = generator_loss(out, scores, disc(out["wav"])[1], fmaps, cfg.loss)
    assert torch.isfinite(total) and set(parts) >= {"mel", "adv", "fm", "dur", "forward_sum", "bin"}
    assert torch.isfinite(discriminator_loss(disc(out["wav"])[0], scores))
    total.backward()
    # every generator parameter takes part in training (DDP relies on it)
    assert all(p.grad is not None for p in model.parameters())


def test_infer_uses_predicted_durations_and_masks_padding(batch):
    torch.manual_seed(0)
    model = BitTTS(tiny_config(scheme="none")).eval()
    wav, lengths = model.infer(batch["phonemes"], batch["phoneme_lengths"], return_lengths=True)
    assert wav.shape[:2] == (3, 1) and wav.shape[2] == int(lengths.max())
    assert (lengths % 256 == 0).all()
    for i, n in enumerate(lengths.tolist()):
        assert (wav[i, 0, n:] == 0).all()
        assert wav[i].abs().max() <= 1.0
    # 1-D input, slower speech
    ids = batch["phonemes"][0, : batch["phoneme_lengths"][0]]
    _, n1 = model.infer(ids, return_lengths=True)
    _, n2 = model.infer(ids, duration_scale=3.0, return_lengths=True)
    assert n2.item() > n1.item()
    assert model.infer(ids, duration_mode="mode").dim() == 3
    with pytest.raises(ValueError, match=r"phoneme ids must lie in \[0, 12\)"):
        model.infer(torch.tensor([1, 99]))
    with pytest.raises(ValueError, match="T_text > 0"):
        model.infer(torch.zeros(1, 0, dtype=torch.long))


def test_binarization_loss_schedule(batch):
    cfg = tiny_config(scheme="none")
    cfg.loss.bin_loss_start, cfg.loss.bin_loss_ramp = 10, 4
    assert [bin_loss_weight(cfg.loss, s) for s in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    torch.manual_seed(0)
    model = BitTTS(cfg)
    out = model(batch)
    disc = Discriminators(cfg.discriminator)
    scores, fmaps = disc(out["wav_hat"])
    real = disc(out["wav"])[1]
    before, parts = generator_loss(out, scores, real, fmaps, cfg.loss, step=0)
    after, _ = generator_loss(out, scores, real, fmaps, cfg.loss, step=100)
    torch.testing.assert_close(after - before, cfg.loss.lambda_align * out["loss_bin"])


def test_mdn_duration_predictor_likelihood_and_prediction():
    log_w = torch.log(torch.tensor([0.7, 0.3])).view(1, 2, 1)
    means = torch.tensor([1.0, 3.0]).view(1, 2, 1)
    log_scales = torch.full((1, 2, 1), -1.0)
    params = (log_w, means, log_scales)
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert MDNDurationPredictor.nll(params, torch.tensor([[1.0]]), mask) < \
        MDNDurationPredictor.nll(params, torch.tensor([[2.0]]), mask)
    torch.testing.assert_close(MDNDurationPredictor.predict(params, "mean"), torch.tensor([[1.6]]))
    torch.testing.assert_close(MDNDurationPredictor.predict(params, "mode"), torch.tensor([[1.0]]))


@pytest.mark.parametrize("scheme", ["none", "ternary"])
def test_weight_norm_folds_without_changing_outputs(batch, scheme):
    torch.manual_seed(0)
    model = build_model(tiny_config(scheme=scheme)).eval()
    ids = batch["phonemes"][:1, : batch["phoneme_lengths"][0]]
    before = model.infer(ids)
    assert model.strip_for_inference() is model
    assert model.acoustic.aligner is None
    assert not any("parametrizations" in k or "aligner" in k for k in model.state_dict())
    torch.testing.assert_close(model.infer(ids), before, atol=1e-5, rtol=1e-5)


def test_discriminators_are_separate_from_the_exported_model():
    cfg = tiny_config(scheme="none")
    model, disc = BitTTS(cfg), Discriminators(cfg.discriminator)
    assert not any(isinstance(m, Discriminators) for m in model.modules())
    assert not {id(p) for p in model.parameters()} & {id(p) for p in disc.parameters()}
    scores, fmaps = disc(torch.randn(2, 1, 4096))
    assert len(scores) == len(cfg.discriminator.periods) + cfg.discriminator.msd_scales
    assert all(s.shape[0] == 2 for s in scores) and all(len(f) > 1 for f in fmaps)


def test_paper_size_parameter_budget():
    cfg = load_preset("fp32")
    cfg.acoustic.n_symbols = 100
    counts = parameter_counts(BitTTS(cfg))
    # 10-26 MB of float32 weights for the exported model (the paper's float model is 25.66 MB)
    assert 10e6 <= 4 * counts["inference_total"] <= 26e6, counts
    assert counts["vocoder"] < counts["acoustic"]


# ----------------------------------------------------------------------------------- quantization

ternq = pytest.importorskip("ternq")
needs_quantize = pytest.mark.skipif(not hasattr(ternq, "quantize"), reason="ternq.quantize not available yet")


def _quantized_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if ternq.is_quantized(m)}


def _layer_names(model: nn.Module, prefix: str) -> set[str]:
    return {n for n, m in model.named_modules()
            if n.startswith(prefix) and isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear))}


@needs_quantize
def test_quantization_presets_select_the_paper_layers():
    torch.manual_seed(0)
    always_float = {"acoustic.pitch_embed", "acoustic.energy_embed"}
    acoustic = build_model(tiny_config(scheme="ternary", scope="acoustic"))
    q = _quantized_names(acoustic)
    layers = _layer_names(acoustic, "acoustic.")
    assert q == {n for n in layers if not n.startswith("acoustic.aligner")} - always_float
    assert not _quantized_names(acoustic.vocoder)

    full = build_model(tiny_config(scheme="ternary", scope="all"))
    q = _quantized_names(full)
    assert "vocoder.conv_post" not in q
    assert _layer_names(full, "vocoder.") - q == {"vocoder.conv_post"}
    assert isinstance(full.vocoder.ups[0].qconfig, ternq.TernaryConfig)

    four = build_model(tiny_config(scheme="kbit", bits=4, scope="all"))
    assert _quantized_names(four) == q
    assert four.vocoder.ups[0].qconfig.bits == 4

    float_model = build_model(tiny_config(scheme="none"))
    assert not _quantized_names(float_model)
    assert isinstance(full, BitTTS) and hasattr(full, "infer")


@needs_quantize
def test_quantized_model_trains_and_state_dict_round_trips(batch):
    torch.manual_seed(0)
    cfg = tiny_config(scheme="ternary", scope="all")
    model = build_model(cfg)
    out = model(batch)
    (out["wav_hat"].abs().mean() + out["loss_dur"]).backward()
    assert model.vocoder.ups[0].parametrizations.weight.original1.grad is not None
    clone = build_model(cfg)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    ids = batch["phonemes"][:1, : batch["phoneme_lengths"][0]]
    torch.testing.assert_close(clone.infer(ids), model.infer(ids))
