"""Third-party architectures from Hugging Face transformers, built from tiny configs (nothing is downloaded).

None of them is fx-traceable as a whole; all must convert. Each test checks the report, a QAT forward and
backward, and that a weight-only QAT model computes what its dequantized (plain float) version computes.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import ternq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

WEIGHT_ONLY = ternq.TernaryConfig(act_bits=None, input_norm=None)


def check(make, run, n_layers: int, config=WEIGHT_ONLY, **kwargs) -> tuple[nn.Module, ternq.Report]:
    """Convert, report, QAT forward + backward, and QAT (weight-only) == dequantized model in eval.

    Returns the dequantized model and the report of the QAT model.
    """
    torch.manual_seed(0)
    model = make().train()
    ternq.quantize(model, **kwargs)
    report = ternq.report(model)
    quantized = [r for r in report.rows if r.decision != "float"]
    assert len(quantized) == n_layers, str(report)
    assert report.bytes_after < report.bytes_before
    out = run(model)
    out.float().square().mean().backward()
    grads = [p.grad for m in model.modules() if ternq.is_quantized(m) for p in m.parameters()]
    reached = [g for g in grads if g is not None]  # layers that feed `out` get a gradient through the STE
    assert len(reached) >= len(grads) // 2 and all(torch.isfinite(g).all() for g in reached)

    torch.manual_seed(0)
    model = make().eval()
    ternq.quantize(model, config=config, **kwargs)
    with torch.no_grad():
        qat = run(model)
        ternq.dequantize(model)
        assert not any(ternq.is_quantized(m) for m in model.modules())
        torch.testing.assert_close(run(model), qat, atol=1e-4, rtol=1e-4)
    return model, report


def test_bert():
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    ids = torch.randint(0, 40, (2, 7))
    # 2 layers x (q, k, v, attn out, ffn in, ffn out) + pooler
    check(lambda: transformers.BertModel(config), lambda m: m(ids).pooler_output, n_layers=13)


def test_gpt2_with_its_conv1d_registered():
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 40, (2, 7))
    make = lambda: transformers.GPT2Model(config)  # noqa: E731
    run = lambda m: m(ids).last_hidden_state  # noqa: E731
    # GPT-2 stores its linear layers as Conv1D (weight transposed, torch.addmm(b, x, W)): found by use, and
    # converted as a functional call whose input is quantized too (BitLinear, weight outputs on dim 1)
    _, report = check(make, run, n_layers=8)
    rows = {r.name: r for r in report.rows if r.decision != "float"}
    assert "h.0.attn.c_attn.weight" in rows and rows["h.0.attn.c_attn.weight"].type == "torch.addmm"
    assert all(r.reason == "" and r.path == "fx" for r in rows.values())
    selected = [r for r in ternq.report(make(), include=[Conv1D]).rows if r.decision != "float"]
    assert len(selected) == 8  # a type selector matches the weights a module of that type holds
    # registered as a layer type, its inputs are quantized too
    try:
        # the registry example: a linear layer whose weight is (in, out), so output channels lie on dim 1
        ternq.register_layer(
            Conv1D, lambda m, x, w: torch.addmm(m.bias, x.flatten(0, -2), w).view(*x.shape[:-1], -1),
            weight_out_dim=1)
        check(make, run, n_layers=8)  # 2 layers x (c_attn, c_proj, mlp.c_fc, mlp.c_proj)
    finally:
        ternq.qat.layers._REGISTRY.pop(Conv1D, None)


def test_llama_with_int4_attention():
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    ids = torch.randint(0, 40, (2, 7))
    model, _ = check(lambda: transformers.LlamaModel(config), lambda m: m(ids).last_hidden_state, n_layers=14,
                  include=[ternq.Rule("*self_attn*", ternq.KBitConfig(bits=4, act_bits=None, input_norm=None)), "*"])
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)


def test_t5_encoder_decoder():
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    ids = torch.randint(0, 40, (2, 7))
    # encoder 2 x (q, k, v, o, wi, wo) + decoder 2 x (self q, k, v, o, cross q, k, v, o, wi, wo)
    check(lambda: transformers.T5Model(config), lambda m: m(ids, decoder_input_ids=ids).last_hidden_state,
          n_layers=32)


def test_fastspeech2_conformer_keeps_its_output_layers_float():
    config = transformers.FastSpeech2ConformerConfig(
        vocab_size=20, hidden_size=16, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
        encoder_num_attention_heads=2, decoder_num_attention_heads=2, encoder_linear_units=32,
        decoder_linear_units=32, speech_decoder_postnet_layers=2, speech_decoder_postnet_units=16,
        duration_predictor_layers=1, duration_predictor_channels=16, pitch_predictor_layers=1,
        pitch_predictor_channels=16, energy_predictor_layers=1, energy_predictor_channels=16, max_source_positions=32)
    make = lambda: transformers.FastSpeech2ConformerModel(config)  # noqa: E731
    ids = torch.randint(1, 20, (1, 6))
    durations = torch.full((1, 6), 2)
    pitch, energy, mel = torch.zeros(1, 6, 1), torch.zeros(1, 6, 1), torch.zeros(1, 12, 8)

    def run(m):  # teacher-forced durations keep the output length fixed
        return m(ids, spectrogram_labels=mel, duration_labels=durations, pitch_labels=pitch, energy_labels=energy,
                 return_dict=True).spectrogram

    # without example inputs, the untraceable attention's pos_bias_u / _v (2-D, added to queries) are reported
    unknown = [r.name for r in ternq.report(make()).rows if r.reason.startswith("use not found")]
    assert len(unknown) == 4 and all(".self_attn.pos_bias_" in n for n in unknown)
    with pytest.raises(ternq.ConversionError, match="strict=True.*pos_bias"):
        ternq.quantize(make(), strict=True)
    example = dict(input_ids=ids, spectrogram_labels=mel, duration_labels=durations, pitch_labels=pitch,
                   energy_labels=energy)
    _, report = check(make, run, n_layers=31, exclude=[ternq.output_layers()], example_inputs=example, strict=True)
    rows = {r.layer: r for r in report.rows}
    assert len(rows) == 36
    assert rows["pitch_embed.conv"].reason.startswith("no input norm: 1 input feature")
    # the mel output and the three variance predictors' heads all reach the model outputs
    float_rows = {name for name, r in rows.items() if r.decision == "float"}
    assert float_rows == {"encoder.embed", "duration_predictor.linear", "pitch_predictor.linear",
                          "energy_predictor.linear", "speech_decoder_postnet.feat_out"}
    assert rows["speech_decoder_postnet.feat_out"].path == "fx"


def test_speecht5_hifigan_final_conv_stays_float():
    config = transformers.SpeechT5HifiGanConfig(model_in_dim=8, upsample_initial_channel=16,
                                                upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
                                                resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])
    mel = torch.randn(5, 8)
    make = lambda: transformers.SpeechT5HifiGan(config)  # noqa: E731
    model, _ = check(make, lambda m: m(mel), n_layers=11, exclude=[ternq.output_layers()])
    assert type(model.conv_post) is nn.Conv1d


def test_vits_converts_and_its_vocoder_matches_dequantized():
    config = transformers.VitsConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, flow_size=8,
        spectrogram_bins=9, upsample_initial_channel=16, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1, duration_predictor_num_flows=1,
        duration_predictor_filter_channels=16, depth_separable_num_layers=1, window_size=2)
    torch.manual_seed(0)
    model = transformers.VitsModel(config)
    ternq.quantize(model, exclude=[ternq.output_layers(of="decoder")], config=WEIGHT_ONLY)
    rows = {r.layer: r.decision for r in ternq.report(model).rows}
    assert rows["decoder.conv_post"] == "float" and rows["decoder.conv_pre"] == "ternary"
    assert [n for n, d in rows.items() if d == "float"] == ["text_encoder.embed_tokens", "decoder.conv_post"]
    torch.manual_seed(0)
    model(torch.randint(0, 20, (1, 6))).waveform.abs().mean().backward()
    assert model.decoder.conv_pre._parameters["weight"].grad is not None  # the latent weight
    spectrogram = torch.randn(1, 8, 5)
    decoder = model.eval().decoder
    with torch.no_grad():
        qat = decoder(spectrogram)
        ternq.dequantize(model)
        assert not any(ternq.is_quantized(m) for m in model.modules())
        torch.testing.assert_close(decoder(spectrogram), qat, atol=1e-5, rtol=1e-4)


def test_clip_output_layers_are_all_of_its_outputs_or_an_error():
    """CLIPModel's forward is untraceable, even leniently: output_layers() must not guess one of its two
    projections; it says so, and with example inputs it records every layer feeding an output."""
    config = transformers.CLIPConfig(
        projection_dim=8,
        text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4))
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    with pytest.raises(ternq.SelectorError, match="example_inputs"):
        ternq.report(model, exclude=[ternq.output_layers()])
    example = dict(input_ids=torch.randint(3, 40, (2, 7)), pixel_values=torch.randn(2, 3, 8, 8))
    ternq.quantize(model, exclude=[ternq.output_layers()], example_inputs=example)
    kept = {r.layer for r in ternq.report(model).rows if r.rule == "exclude[0] output_layers()"}
    # both projections, and the vision encoder's last residual branches (its last_hidden_state is an output
    # before any norm); the text encoder's last_hidden_state comes out of final_layer_norm: a barrier
    assert kept == {"text_projection", "visual_projection", "vision_model.encoder.layers.0.self_attn.out_proj",
                    "vision_model.encoder.layers.0.mlp.fc2"}
