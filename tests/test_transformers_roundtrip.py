"""The documented transformers recipe (docs/transformers.md): quantize, train, save the packed file and the config,
then load both in a fresh process and get the same outputs; ``save_pretrained`` on a packed model refuses."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ternq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                                   bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=1, max_position_embeddings=16)),
}

# the second process: what a user runs to load the model back (nothing from the first process but the files)
LOAD = textwrap.dedent("""
    import os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch, transformers, ternq
    directory = sys.argv[1]
    config = transformers.AutoConfig.from_pretrained(directory)
    skeleton = transformers.AutoModelForCausalLM.from_config(config)
    model = ternq.load_packed(os.path.join(directory, "model.safetensors"), skeleton).eval()
    ids = torch.load(os.path.join(directory, "ids.pt"))
    with torch.no_grad():
        torch.save(model(ids).logits, os.path.join(directory, "logits.pt"))
""")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_quantize_train_save_and_load_in_a_fresh_process(arch: str, tmp_path: Path) -> None:
    config_name, model_name, kwargs = CONFIGS[arch]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    ids = torch.randint(0, 64, (2, 8))
    ternq.quantize(model, example_inputs=(ids,), strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    ternq.save_packed(model, tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    torch.save(ids, tmp_path / "ids.pt")

    done = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    logits = torch.load(tmp_path / "logits.pt")
    close = (logits - expected).abs() <= 1e-4 + 1e-4 * expected.abs()  # the runtime's tolerance (ternq.runtime)
    assert close.float().mean() >= 0.99 and (logits - expected).abs().max() <= 0.01 * expected.abs().max()


def test_save_pretrained_of_a_packed_model_refuses(tmp_path: Path) -> None:
    config_name, model_name, kwargs = CONFIGS["gpt2"]
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, model_name)(config)
    ternq.quantize(model)
    ternq.save_packed(model, tmp_path / "model.safetensors")
    loaded = ternq.load_packed(tmp_path / "model.safetensors", getattr(transformers, model_name)(config))
    for method in ("save_pretrained", "push_to_hub"):
        with pytest.raises(ternq.ConversionError, match=r"save_packed.*load_packed"):
            getattr(loaded, method)(tmp_path / "hub")
    assert not (tmp_path / "hub").exists()
    # loaded as float weights (codes * scale), it is a plain model again, which save_pretrained can write
    plain = ternq.load_packed(tmp_path / "model.safetensors", getattr(transformers, model_name)(config),
                              dequantize=True)
    plain.save_pretrained(tmp_path / "float")
    assert (tmp_path / "float" / "model.safetensors").exists()
