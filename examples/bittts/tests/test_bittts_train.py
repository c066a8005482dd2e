"""Training loop: it learns, resumes exactly, skips non-finite steps, runs from the CLI and under torchrun (DDP)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from bittts.cli import main as cli_main
from bittts.config import apply_overrides, config_to_dict, load_preset
from bittts.data.text import SYMBOLS
from bittts.model.bittts import TRAINING_ONLY, BitTTS, build_model
from bittts.model.discriminators import Discriminators
from bittts.training.checkpoints import load_checkpoint, model_from_checkpoint
from bittts.training.export import export_model
from bittts.training.loop import NonFiniteLossError, train
from bittts.training.warmstart import load_init_weights
from bittts_synthetic import N_SYMBOLS, SyntheticTTS, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*overrides: str):
    cfg = apply_overrides(load_preset("tiny"), list(overrides))
    cfg.acoustic.n_symbols = N_SYMBOLS
    return cfg


def test_tiny_ternary_model_learns(tmp_path):
    """Loss curves fall on a small synthetic corpus (the `tiny` preset: ternary acoustic model and vocoder)."""
    torch.manual_seed(0)
    result = train(tiny("train.log_every=1", "train.image_every=0"), tmp_path / "run",
                   dataset=SyntheticTTS(8), steps=30, progress=False)
    mel = [h["mel"] for h in result["history"]]
    total = [h["loss_g"] for h in result["history"]]
    assert len(mel) == 30 and result["skipped"] == 0
    first, last = sum(mel[:5]) / 5, sum(mel[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert sum(total[-5:]) < 0.8 * sum(total[:5])


def test_reconstruction_warmup_runs_no_discriminator_and_mel_head_is_training_only(tmp_path):
    """loss.adv_start: before it the discriminators are not run (loss_d, adv, fm are 0 and their weights do not
    move); after it they train. loss.lambda_mel_aux adds a logged mel_aux loss through a mel head that the
    inference form drops."""
    cfg = tiny("train.log_every=1", "train.image_every=0", "loss.adv_start=3", "loss.lambda_mel_aux=1.0")
    data = SyntheticTTS(4)
    torch.manual_seed(0)
    result = train(cfg, tmp_path / "run", dataset=data, steps=3, progress=False)
    first = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(h["loss_d"] == 0 and h["adv"] == 0 and h["fm"] == 0 for h in result["history"])
    assert all(h["mel_aux"] > 0 for h in result["history"])
    result = train(cfg, tmp_path / "run", dataset=data, steps=5, resume=True, progress=False)
    assert all(h["loss_d"] > 0 and h["adv"] > 0 for h in result["history"])
    second = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    torch.manual_seed(cfg.train.seed)  # the trainer's seeding: the model, then the discriminators
    build_model(cfg)
    fresh = Discriminators(cfg.discriminator)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(first["discriminators"][k], v, msg=k)  # untouched during the warm-up
    assert any(not torch.equal(first["discriminators"][k], second["discriminators"][k]) for k in fresh.state_dict())
    assert any(k.startswith("mel_head.") for k in model_from_checkpoint(second).state_dict())
    assert not any(k.startswith("mel_head.") for k in model_from_checkpoint(second, inference=True).state_dict())


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def test_resume_continues_exactly(tmp_path):
    """4 steps straight == 2 steps + --resume 2 more: identical weights, optimizer states and data position."""
    cfg = tiny("train.grad_accum=2", "train.image_every=0")
    data = SyntheticTTS(6)
    train(cfg, tmp_path / "straight", dataset=data, steps=4, progress=False)
    train(cfg, tmp_path / "split", dataset=data, steps=2, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "split", dataset=data, steps=4, progress=False)
    with pytest.raises(ValueError, match="different config"):
        train(tiny("train.lr=0.5"), tmp_path / "split", dataset=data, steps=4, resume=True, progress=False)
    train(cfg, tmp_path / "split", dataset=data, steps=4, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    wall = (a["state"].pop("seconds"), b["state"].pop("seconds"))
    assert a["state"] == b["state"] and a["state"]["step"] == 4
    assert all(s > 0 for s in wall)  # wall time adds up over resumed segments, it is not replayed
    for part in ("model", "discriminators", "optim_g", "optim_d"):
        ta, tb = dict(_tensors(a[part])), dict(_tensors(b[part]))
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{part}{k} differs after resume"
    assert a["sched_g"] == b["sched_g"]
    # the checkpoint rebuilds the quantized model for export / synthesis
    model = model_from_checkpoint(a)
    assert model.infer(torch.tensor([1, 2, 3])).shape[-1] > 0


class _Poisoned(torch.utils.data.Dataset):
    """Wraps a dataset; items in `bad` get a NaN waveform."""

    def __init__(self, base, bad):
        self.base, self.bad = base, set(bad)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        if i in self.bad:
            item["wav"] = torch.full_like(item["wav"], float("nan"))
        return item


def test_resume_may_change_dropout_as_a_recorded_recipe_change(tmp_path):
    data = SyntheticTTS(4)
    train(tiny("train.image_every=0"), tmp_path / "run", dataset=data, steps=2, progress=False)
    messages = []
    train(tiny("train.image_every=0", "acoustic.variance_dropout=0.3"), tmp_path / "run", dataset=data, steps=3,
          resume=True, progress=False, log=messages.append)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["config"]["acoustic"]["variance_dropout"] == 0.3
    assert ckpt["recipe_changes"] == [{"step": 2, "changes": ["acoustic.variance_dropout: 0.0 -> 0.3"]}]
    assert any("recipe change from step 2" in m for m in messages)
    with pytest.raises(ValueError, match="different config"):  # shapes and losses stay fixed
        train(tiny("train.image_every=0", "acoustic.variance_dropout=0.3", "acoustic.dec_layers=3"),
              tmp_path / "run", dataset=data, steps=4, resume=True, progress=False)


def test_nonfinite_steps_are_skipped_then_abort(tmp_path):
    base = SyntheticTTS(4)
    messages = []
    # one poisoned item in 2 batches per epoch: 2 of 4 steps skipped, weights stay finite
    result = train(tiny("train.image_every=0"), tmp_path / "some", dataset=_Poisoned(base, {0}), steps=4,
                   progress=False, log=messages.append)
    assert result["skipped"] == 2
    assert sum("non-finite" in m for m in messages) == 2
    ckpt = load_checkpoint(tmp_path / "some" / "checkpoint.pt")
    assert all(torch.isfinite(t).all() for _, t in _tensors(ckpt["model"]))
    # every item poisoned: abort after max_nonfinite in a row
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(tiny("train.max_nonfinite=3", "train.image_every=0"), tmp_path / "all",
              dataset=_Poisoned(base, range(4)), steps=10, progress=False, log=lambda m: None)


def test_cli_train_writes_checkpoint_logs_and_images(tmp_path, capsys):
    data = write_corpus(tmp_path / "data", n_train=4)
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--steps", "2",
                     "--device", "auto", "--no-progress", "--set", "train.image_every=2"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["config"]["acoustic"]["n_symbols"] == N_SYMBOLS  # taken from the corpus' symbol table
    assert ckpt["symbols"][0] == "<pad>" and len(ckpt["rng"]) == 1
    assert (run / "config.toml").read_text().startswith('name = "tiny"')
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert (run / "images" / "mel_0000002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --resume without --preset continues with the checkpoint's config
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--steps", "3", "--resume",
                     "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["state"]["step"] == 3
    with pytest.raises(SystemExit, match="choose a model with --preset"):
        cli_main(["train", "--data", str(data), "--out", str(tmp_path / "new")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo processes x batch 2 computes the same gradients as 1 process x batch 4."""
    # equal-length utterances and segments covering them: no per-process randomness, equal loss weights.
    # Ternary weights but float activations: 8-bit activation rounding turns the last-bit differences between
    # batch sizes (different conv blocking) into whole quantization steps, which is not what this test is about.
    data = write_corpus(tmp_path / "data", n_train=8, fixed=(5, 4))
    sets = ["train.segment_frames=20", "train.image_every=0", "train.log_every=1", "quant.config.act_bits=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "bittts.cli", "train", "--data", str(data),
           "--out", str(tmp_path / "ddp"), "--preset", "tiny", "--steps", "1", "--device", "cpu", "--no-progress",
           "--set", "train.batch_size=2", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = apply_overrides(load_preset("tiny"), ["train.batch_size=4", *sets])
    train(single, tmp_path / "single", data_dir=data, steps=1, progress=False, device="cpu")
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    one = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    # after one AdamW step exp_avg = (1 - beta1) * grad: the averaged DDP gradient equals the big-batch one
    for opt in ("optim_g", "optim_d"):
        grads_ddp = dict(_tensors(ddp[opt]["state"]))
        grads_one = dict(_tensors(one[opt]["state"]))
        assert grads_ddp.keys() == grads_one.keys()
        for k in grads_ddp:
            if k.endswith("exp_avg"):  # relative error of the whole tensor: float32 sums cancel in places
                err = (grads_ddp[k] - grads_one[k]).norm() / grads_one[k].norm().clamp_min(1e-12)
                assert err < 1e-3, f"{opt}{k}: relative gradient error {err:.2e}"
    # and the weights agree (Adam's first step is sign-like: allow the rare flip of a near-zero gradient)
    for k, w in one["model"].items():
        close = torch.isclose(ddp["model"][k], w, rtol=1e-4, atol=1e-6)
        assert close.float().mean() > 0.99, k


@pytest.mark.parametrize("source_form, weight_norm", [("export", True), ("checkpoint", False)])
def test_warm_start_weights_are_the_sources(source_form, weight_norm):
    """load_init_weights rebuilds the source's function: an export's folded weights become weight norm again, a
    weight-normed checkpoint's (g, v) fold into a run built without weight norm (vocoder.weight_norm=false), and
    a training-only part the run does not have (the source's mel head) is left behind."""
    torch.manual_seed(0)
    source_cfg = tiny("quant.config={}", "loss.lambda_mel_aux=1.0")
    source = BitTTS(source_cfg)
    state = source.state_dict()
    if source_form == "export":
        state = model_from_checkpoint({"config": config_to_dict(source_cfg), "model": state}, inference=True
                                      ).state_dict()
    model = BitTTS(tiny("quant.config={}", f"vocoder.weight_norm={str(weight_norm).lower()}"))
    rebuilt = load_init_weights(model, {"state": state, "config": source_cfg, "symbols": None})
    assert all(k.startswith(TRAINING_ONLY) for k in rebuilt) and bool(rebuilt) == (source_form == "export")
    model.remove_weight_norm()
    source.remove_weight_norm()
    for k, v in model.state_dict().items():
        if not k.startswith(TRAINING_ONLY):
            torch.testing.assert_close(v, source.state_dict()[k], rtol=1e-6, atol=1e-7, msg=k)


def test_warm_start_from_an_exported_float_model(tmp_path):
    """--init-from: a float export's weights start a ternary run (weight norm rebuilt from the folded weights, a
    fresh aligner warmed up first); the checkpoint records the source, and a resumed run keeps the record."""
    data = SyntheticTTS(4)
    float_cfg = tiny("train.image_every=0", "quant.config={}")
    float_cfg.acoustic.n_symbols = len(SYMBOLS)  # an export needs the package's symbol table
    train(float_cfg, tmp_path / "float", dataset=data, steps=2, progress=False)
    export_model(tmp_path / "float" / "checkpoint.pt", tmp_path / "float.safetensors")
    cfg = tiny("train.image_every=0", "train.aligner_warmup=2")
    cfg.acoustic.n_symbols = len(SYMBOLS)
    messages: list[str] = []
    train(cfg, tmp_path / "warm", dataset=data, steps=2, progress=False, log=messages.append,
          init_from=tmp_path / "float.safetensors")
    init = load_checkpoint(tmp_path / "warm" / "checkpoint.pt")["init"]
    assert (init["file"], init["step"], init["preset"], init["aligner_warmup"]) == ("float.safetensors", 2, "tiny", 2)
    assert any(m.startswith("aligner warm-up: 2 steps") for m in messages)
    assert any(m.endswith("freshly initialized: acoustic.aligner") for m in messages)
    train(cfg, tmp_path / "warm", dataset=data, steps=3, resume=True, progress=False)
    assert load_checkpoint(tmp_path / "warm" / "checkpoint.pt")["init"] == init
    with pytest.raises(ValueError, match="warm starts begin from float weights"):
        train(cfg, tmp_path / "again", dataset=data, steps=1, progress=False, init_from=tmp_path / "warm")
