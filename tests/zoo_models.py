"""The architecture zoo of tests/test_zoo.py: small factories for models ternq's other tests never built.

Each `Arch` builds a float model from a tiny config (nothing is downloaded), holds fixed example inputs and says
how to get one output tensor from the model. Dropout is off everywhere, so a training step is deterministic.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ternq.uses import _call

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Arch:
    """One zoo entry.

    Attributes:
        name: the test id.
        make: builds the float model (the caller seeds torch first).
        inputs: builds the example inputs: a tensor, a tuple of positional arguments or a dict of keyword ones.
        out: one output tensor of a model run on the inputs.
        needs_transformers: skip when transformers is missing.
    """

    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    out: Callable[[nn.Module, Any], Tensor]
    needs_transformers: bool = False


# run a model on example inputs exactly as quantize(..., example_inputs=) does (dict -> kwargs, tuple -> args)
call = _call


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def ids(batch: int = 2, length: int = 7, vocab: int = 40, seed: int = 1) -> Tensor:
    return torch.randint(0, vocab, (batch, length), generator=_gen(seed))


def first(model: nn.Module, inputs: Any) -> Tensor:
    out = call(model, inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def hidden(model: nn.Module, inputs: Any) -> Tensor:
    return call(model, inputs).last_hidden_state


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


# --- torch.nn --------------------------------------------------------------------------------------------------


class MatmulModule(nn.Module):
    """Own parameters used through ``@``, torch.matmul and torch.einsum (no nn.Linear anywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(8, 16) / 8 ** 0.5)  # (in, out): x @ w
        self.w_mid = nn.Parameter(torch.randn(16, 16) / 4)  # (in, out): torch.matmul
        self.w_out = nn.Parameter(torch.randn(6, 16) / 4)  # (out, in): einsum
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(x @ self.w_in)
        h = torch.relu(torch.matmul(h, self.w_mid))
        return torch.einsum("bsi,oi->bso", h, self.w_out) + self.bias


class FusedMoE(nn.Module):
    """A mixture of experts whose experts are one 3-D parameter, indexed per expert: F.linear(x, w[idx])."""

    def __init__(self, dim: int = 16, hidden: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, hidden, dim) / dim ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, dim, hidden) / hidden ** 0.5)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights = self.router(flat).softmax(-1)
        top = weights.argmax(-1)
        out = torch.zeros_like(flat)
        for idx in range(self.up.shape[0]):
            mask = top == idx
            if mask.any():
                h = F.gelu(F.linear(flat[mask], self.up[idx]))
                out[mask] = F.linear(h, self.down[idx]) * weights[mask, idx, None]
        return self.head(flat + out).reshape(*x.shape[:-1], -1)


class CellLoop(nn.Module):
    """An LSTMCell and a GRUCell stepped in a Python loop (the cells' native kernels read their weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(8, 16)
        self.gru = nn.GRUCell(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = c = g = x.new_zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            h, c = self.lstm(x[:, t], (h, c))
            g = self.gru(h, g)
        return self.out(g)


class GrayscaleCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


TORCH_ZOO = [
    Arch("multihead_attention", lambda: nn.MultiheadAttention(16, 2, batch_first=True),
         lambda: (randn(2, 5, 16),) * 3, first),
    Arch("multihead_attention_kdim", lambda: nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True),
         lambda: (randn(2, 5, 16), randn(2, 6, 8, seed=2), randn(2, 6, 12, seed=3)), first),
    Arch("transformer_encoder", _encoder, lambda: randn(2, 5, 16), first),
    Arch("transformer", lambda: nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True),
         lambda: (randn(2, 5, 16), randn(2, 4, 16, seed=2)), first),
    Arch("lstm_2layer_bidirectional", lambda: nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True),
         lambda: randn(2, 5, 8), first),
    Arch("gru", lambda: nn.GRU(8, 16, batch_first=True), lambda: randn(2, 5, 8), first),
    Arch("rnn", lambda: nn.RNN(8, 16, num_layers=2), lambda: randn(5, 2, 8), first),
    Arch("rnn_cells", CellLoop, lambda: randn(2, 5, 8), first),
    Arch("bilinear", lambda: nn.Bilinear(8, 6, 5), lambda: (randn(4, 8), randn(4, 6, seed=2)), first),
    Arch("conv3d", lambda: nn.Sequential(nn.Conv3d(3, 8, 3), nn.ReLU(), nn.Conv3d(8, 4, 3)),
         lambda: randn(2, 3, 6, 6, 6), first),
    Arch("conv_transpose2d",
         lambda: nn.Sequential(nn.ConvTranspose2d(4, 8, 3, stride=2), nn.ReLU(), nn.ConvTranspose2d(8, 3, 3)),
         lambda: randn(2, 4, 5, 5), first),
    Arch("conv_transpose3d",
         lambda: nn.Sequential(nn.ConvTranspose3d(4, 8, 3, stride=2), nn.ReLU(), nn.ConvTranspose3d(8, 3, 2)),
         lambda: randn(2, 4, 3, 3, 3), first),
    Arch("grayscale_cnn", GrayscaleCNN, lambda: randn(4, 1, 8, 8), first),
    Arch("matmul_einsum_params", MatmulModule, lambda: randn(2, 5, 8), first),
    Arch("fused_moe", FusedMoE, lambda: randn(2, 6, 16), first),
]


# --- transformers ----------------------------------------------------------------------------------------------


def _tf() -> Any:
    import transformers

    return transformers


def _lm(config_name: str, model_name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        tf = _tf()
        return no_dropout(getattr(tf, model_name)(getattr(tf, config_name)(**kwargs)))
    return make


_DEC = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=16)


def _clip_out(model: nn.Module, inputs: Any) -> Tensor:
    out = call(model, inputs)
    return torch.cat([out.text_embeds, out.image_embeds])


def _encodec_out(model: nn.Module, inputs: Any) -> Tensor:
    return model.decoder(model.encoder(inputs))  # the residual vector quantizer's argmin has no gradient


def _seq2seq(model: nn.Module, inputs: Any) -> Tensor:
    return call(model, inputs).last_hidden_state


_AUDIO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
              conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
              mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
              feat_proj_dropout=0.0, layerdrop=0.0)

TRANSFORMERS_ZOO = [
    Arch("gpt2", _lm("GPT2Config", "GPT2LMHeadModel", vocab_size=40, n_embd=16, n_layer=2, n_head=2,
                     n_positions=16, bos_token_id=0, eos_token_id=0),
         lambda: ids(), lambda m, x: m(x).logits),
    Arch("mixtral", _lm("MixtralConfig", "MixtralModel", **_DEC, num_local_experts=4, num_experts_per_tok=2),
         lambda: ids(), hidden),
    Arch("qwen2_moe", _lm("Qwen2MoeConfig", "Qwen2MoeModel", **_DEC, moe_intermediate_size=16,
                          shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
         lambda: ids(), hidden),
    Arch("qwen3_moe", _lm("Qwen3MoeConfig", "Qwen3MoeModel", **_DEC, moe_intermediate_size=16, num_experts=4,
                          num_experts_per_tok=2, head_dim=8),
         lambda: ids(), hidden),
    Arch("gpt_oss", _lm("GptOssConfig", "GptOssModel", **{**_DEC, "intermediate_size": 16}, head_dim=8,
                        num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                        layer_types=["full_attention"]),
         lambda: ids(), hidden),
    Arch("deepseek_v3", _lm("DeepseekV3Config", "DeepseekV3Model", vocab_size=40, hidden_size=16,
                            intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                            first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                            topk_group=1, n_shared_experts=1, num_attention_heads=2, num_key_value_heads=2,
                            q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                            max_position_embeddings=16),
         lambda: ids(), hidden),
    Arch("mamba", _lm("MambaConfig", "MambaModel", vocab_size=40, hidden_size=16, state_size=4,
                      num_hidden_layers=1, expand=2, conv_kernel=4, time_step_rank=4),
         lambda: ids(), hidden),
    Arch("bamba", _lm("BambaConfig", "BambaModel", vocab_size=40, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, attn_layer_indices=[1], num_attention_heads=2, num_key_value_heads=1,
                      mamba_n_heads=2, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1, mamba_chunk_size=4,
                      mamba_expand=2, mamba_d_conv=4, max_position_embeddings=16),
         lambda: ids(length=8), hidden),
    Arch("falcon", _lm("FalconConfig", "FalconModel", vocab_size=40, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2), lambda: ids(), hidden),
    Arch("phi", _lm("PhiConfig", "PhiModel", **{**_DEC, "num_key_value_heads": 2}), lambda: ids(), hidden),
    Arch("distilbert", _lm("DistilBertConfig", "DistilBertModel", vocab_size=40, dim=16, n_layers=1, n_heads=2,
                           hidden_dim=32, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0),
         lambda: ids(), hidden),
    Arch("bart", _lm("BartConfig", "BartModel", vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                     max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
         lambda: dict(input_ids=ids(), decoder_input_ids=ids(length=5, seed=2)), _seq2seq),
    Arch("whisper", _lm("WhisperConfig", "WhisperModel", vocab_size=40, num_mel_bins=8, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, d_model=16,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16,
                        dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
         lambda: dict(input_features=randn(2, 8, 16), decoder_input_ids=ids(length=5)), _seq2seq),
    Arch("vit", _lm("ViTConfig", "ViTModel", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, image_size=8, patch_size=4, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0),
         lambda: randn(2, 3, 8, 8), hidden),
    Arch("dinov2", _lm("Dinov2Config", "Dinov2Model", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       mlp_ratio=2, image_size=8, patch_size=4),
         lambda: randn(2, 3, 8, 8), hidden),
    Arch("clip", _lm("CLIPConfig", "CLIPModel", projection_dim=8,
                     text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=8, patch_size=4)),
         lambda: dict(input_ids=ids(), pixel_values=randn(2, 3, 8, 8)), _clip_out),
    Arch("convnext", _lm("ConvNextConfig", "ConvNextModel", num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                         num_stages=2, image_size=16),
         lambda: randn(2, 3, 16, 16), hidden),
    Arch("swin", _lm("SwinConfig", "SwinModel", image_size=16, patch_size=2, num_channels=3, embed_dim=8,
                     depths=[1, 1], num_heads=[1, 2], window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, drop_path_rate=0.0),
         lambda: randn(2, 3, 16, 16), hidden),
    Arch("resnet", _lm("ResNetConfig", "ResNetModel", num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                       depths=[1, 1], layer_type="basic"),
         lambda: randn(2, 3, 16, 16), hidden),
    Arch("rwkv", _lm("RwkvConfig", "RwkvModel", vocab_size=40, hidden_size=16, num_hidden_layers=2,
                     attention_hidden_size=16, intermediate_size=32, context_length=16, rescale_every=1),
         lambda: ids(), hidden),
    Arch("hubert", _lm("HubertConfig", "HubertModel", **_AUDIO), lambda: randn(2, 400), hidden),
    Arch("wav2vec2_conformer", _lm("Wav2Vec2ConformerConfig", "Wav2Vec2ConformerModel", **_AUDIO,
                                   conv_depthwise_kernel_size=3, position_embeddings_type="relative"),
         lambda: randn(2, 400), hidden),
    Arch("encodec", _lm("EncodecConfig", "EncodecModel", target_bandwidths=[1.5], sampling_rate=800,
                        audio_channels=1, num_filters=4, num_residual_layers=1, upsampling_ratios=[2, 2],
                        codebook_size=16, hidden_size=8, num_lstm_layers=2, kernel_size=3,
                        last_kernel_size=3, residual_kernel_size=3),
         lambda: randn(2, 1, 64), _encodec_out),
    # issue 16's architectures (tests/test_by_construction.py puts them through their read paths one by one)
    Arch("recurrent_gemma", _lm("RecurrentGemmaConfig", "RecurrentGemmaModel", num_hidden_layers=2, vocab_size=40,
                                hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                lru_width=16, attention_window_size=16, conv1d_width=4,
                                block_types=["recurrent", "attention"]),
         lambda: ids(), hidden),
    Arch("falcon_h1", _lm("FalconH1Config", "FalconH1Model", **{**_DEC, "num_hidden_layers": 2}, head_dim=8,
                          mamba_d_ssm=16, mamba_n_heads=2, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4,
                          mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4),
         lambda: ids(length=8), hidden),
    Arch("gemma3n_text", _lm("Gemma3nTextConfig", "Gemma3nTextModel", **{**_DEC, "num_hidden_layers": 2},
                             vocab_size_per_layer_input=40, hidden_size_per_layer_input=4, head_dim=8,
                             sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                             num_kv_shared_layers=0, laurel_rank=4, altup_num_inputs=2,
                             activation_sparsity_pattern=[0.0, 0.0]),
         lambda: ids(length=6), hidden),
    Arch("sam", _lm("SamConfig", "SamModel",
                    vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8, mlp_dim=32, global_attn_indexes=[0],
                                       num_pos_feats=4, window_size=0),
                    prompt_encoder_config=dict(hidden_size=8, image_size=32, patch_size=8, mask_input_channels=4),
                    mask_decoder_config=dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16,
                                             iou_head_hidden_dim=8)),
         lambda: dict(pixel_values=randn(1, 3, 32, 32), input_points=randn(1, 1, 2, 2, seed=2).abs() * 16),
         lambda m, x: call(m, x).pred_masks),
]

ZOO = [*TORCH_ZOO, *[Arch(a.name, a.make, a.inputs, a.out, True) for a in TRANSFORMERS_ZOO]]
