"""The BitTTS training loop: JETS joint training (acoustic model + HiFi-GAN) with optional ternq QAT.

One explicit loop, nanoGPT style. Per optimizer step, for each of `grad_accum` micro-batches:

    out = model(batch)                                   # teacher-forced acoustic pass + vocoder on a segment
    D loss on (real segment, generated segment detached)  -> backward into the discriminators
    G loss = 45 mel + adv + 2 fm + dur + pitch + energy + 2 (forward-sum + w(step) bin) [+ mel_aux] -> backward
then both AdamW optimizers step (grads clipped) and both ExponentialLR schedulers advance. Both networks are
updated from the same discriminator state (simultaneous updates), which is what makes gradient accumulation
exact: every micro-batch sees the same networks. During a reconstruction-only warm-up (`step < loss.adv_start`)
the discriminators are not run at all: no D loss, no adversarial or feature-matching term.

Runs on one process or under `torchrun` (DistributedDataParallel; gloo on CPU, nccl on CUDA; batch_size is per
process). Rank 0 writes `RUN_DIR/checkpoint.pt` (atomically), `config.toml`, `metrics.jsonl`, TensorBoard logs in
`RUN_DIR/tb/` and mel images in `RUN_DIR/images/`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_torch_save, atomic_write
from .config import BitTTSConfig, config_from_dict, config_to_dict, save_config
from .discriminators import Discriminators, split_halves
from .extras import require
from .losses import adversarial_active, discriminator_loss, generator_loss, mel_spectrogram
from .model import CHECKPOINT_FORMAT, BitTTS, apply_quantization, load_checkpoint, parameter_counts

__all__ = ["train", "mel_figure", "NonFiniteLossError", "TrainState", "resolve_device", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
# train.* fields a resumed run may change: they decide what is logged and when, and how fast, not what is computed
BOOKKEEPING = ("steps", "log_every", "image_every", "ckpt_every", "num_workers", "max_nonfinite", "threads")
# config fields a resumed run may change on purpose, as a recorded recipe change: regularization that changes no
# parameter shape (e.g. switching the predictors' dropout off mid-run). Each change is logged and kept in the
# checkpoint's "recipe_changes" (and the exported model's metadata).
RECIPE_CHANGES = {"acoustic": ("dropout", "variance_dropout")}


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_nonfinite` consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainState:
    """Where training is: optimizer steps done and the position in the data order."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped: int = 0
    seconds: float = 0.0  # training wall time over every resumed segment, up to the last checkpoint


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's CUDA device when CUDA is available, else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected 'auto', 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device; use --device auto or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables (1 process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


# ----------------------------------------------------------------------------------------------- data order


class _Batches:
    """Endless per-process batches in a deterministic order: epoch e shuffles with seed (seed, e); global batch k
    is permutation slice [k*B*W, (k+1)*B*W) and process r takes its r-th B items. Position lives in `state`, so
    a resumed run continues with the next batch; one process with batch B*W sees exactly the same items."""

    def __init__(self, dataset: Dataset, collate: Callable, batch_size: int, rank: int, world: int, seed: int,
                 num_workers: int, state: TrainState) -> None:
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.num_workers, self.state = num_workers, state
        n = len(dataset)  # type: ignore[arg-type]
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"the training set has {n} utterances, fewer than one global batch "
                             f"(batch_size {batch_size} x {world} processes); lower train.batch_size "
                             "(e.g. --set train.batch_size=2) or prepare more data")

    def plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        gb, b, r = self.batch_size * self.world, self.batch_size, self.rank
        return [perm[k * gb + r * b: k * gb + (r + 1) * b] for k in range(self.per_epoch)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            plan = self.plan(self.state.epoch)[self.state.batch_in_epoch:]
            # own generator: creating a DataLoader iterator must not consume the global RNG (exact resume)
            loader = DataLoader(self.dataset, batch_sampler=plan, collate_fn=self.collate,
                                num_workers=self.num_workers, generator=torch.Generator())
            for batch in loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ rng state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------- checkpoints


def _gather_rng(world: int) -> list[dict[str, Any]]:
    state = _rng_state()
    if world == 1:
        return [state]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, state)
    return out


# ------------------------------------------------------------------------------------------------- images


def mel_figure(panels: list[tuple[str, Tensor]], path: Path) -> np.ndarray:
    """Write a PNG with one mel spectrogram per row; returns the RGB image (for TensorBoard)."""
    require("publish", "drawing mel spectrograms")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.2 * len(panels)), dpi=80)
    canvas = FigureCanvasAgg(fig)
    for i, (title, mel) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        im = ax.imshow(mel.float().cpu().numpy(), origin="lower", aspect="auto", interpolation="none",
                       vmin=-11.5, vmax=2.0)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("mel bin")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write(path, png.getvalue())
    return rgb


@torch.no_grad()
def _snapshot(model: BitTTS, batch: dict[str, Any], out: dict[str, Any], path: Path) -> np.ndarray:
    """Target vs generated mels: the training segment (teacher-forced durations) and the first utterance
    synthesized from its phonemes alone (predicted durations, pitch and energy)."""
    seg_real = mel_spectrogram(out["wav"][:1].detach())[0]
    seg_fake = mel_spectrogram(out["wav_hat"][:1].detach().float())[0]
    n_text, n_mel = int(batch["phoneme_lengths"][0]), int(batch["mel_lengths"][0])
    was_training = model.training
    model.eval()
    try:
        hidden, frames = model.acoustic.infer(batch["phonemes"][:1, :n_text], batch["phoneme_lengths"][:1])
        hidden = hidden[..., : max(2 * n_mel, 1)]  # an untrained duration predictor may ramble
        synth = mel_spectrogram(model.vocoder(hidden))[0]
    finally:
        model.train(was_training)
    return mel_figure([
        ("target: training segment", seg_real),
        ("generated: training segment (teacher-forced durations)", seg_fake),
        (f"target: {batch['ids'][0]}", batch["mel"][0, :, :n_mel]),
        (f"synthesized from phonemes: {batch['ids'][0]} ({int(frames[0])} frames)", synth),
    ], path)


# ---------------------------------------------------------------------------------------------- the step


def _no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    return module.no_sync() if skip and isinstance(module, DDP) else contextlib.nullcontext()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of a metrics log (JSON objects with a "step") up to `step`, in increasing step order;
    drop the rest (steps logged after the checkpoint a run resumes from, a line cut by a kill). Atomic."""
    if not path.exists():
        return
    kept, last = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                entry = json.loads(raw)
            except ValueError:
                break  # a line cut by a kill: nothing after it is trustworthy
            n = entry.get("step") if isinstance(entry, dict) else None
            if type(n) is not int or not last < n <= step:
                break
            kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
            last = n
    atomic_write(path, b"".join(kept))


def _train_step(gen: nn.Module, disc: nn.Module, model: BitTTS, discriminators: Discriminators,
                opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, batches: Iterator[dict[str, Any]],
                cfg: BitTTSConfig, device: torch.device, world: int, step: int
                ) -> tuple[bool, dict[str, float], Any, Any]:
    """One optimizer step (number `step`, counting from 0) over grad_accum micro-batches.
    Returns (finite, logged values, last batch, last out)."""
    accum = cfg.train.grad_accum
    adversarial = adversarial_active(cfg.loss, step)
    opt_g.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    g_params = [p for p in model.parameters() if p.requires_grad]
    logs: dict[str, float] = defaultdict(float)
    finite = True
    batch = out = None
    for i in range(accum):
        batch = _to_device(next(batches), device)
        last = i == accum - 1
        with _no_sync(gen, not last), _no_sync(disc, not last):
            out = gen(batch)
            real, fake = out["wav"], out["wav_hat"]
            if adversarial:
                # discriminator: one call on [real; fake] (a single DDP forward), generator output detached
                (real_scores, _), (fake_scores, _) = split_halves(disc(torch.cat([real, fake.detach()])),
                                                                  real.shape[0])
                loss_d = discriminator_loss(real_scores, fake_scores)
                (loss_d / accum).backward()
                # generator: through the raw discriminators, gradients only into the generator's parameters
                with torch.no_grad():
                    _, real_fmaps = discriminators(real)
                fake_scores, fake_fmaps = discriminators(fake)
            else:  # reconstruction-only warm-up: the discriminators are not run at all
                loss_d = real.new_zeros(())
                fake_scores = real_fmaps = fake_fmaps = None
            loss_g, parts = generator_loss(out, fake_scores, real_fmaps, fake_fmaps, cfg.loss, step)
            torch.autograd.backward(loss_g / accum, inputs=g_params)
        finite = finite and bool(torch.isfinite(loss_g)) and bool(torch.isfinite(loss_d))
        logs["loss_g"] += float(loss_g.detach()) / accum
        logs["loss_d"] += float(loss_d.detach()) / accum
        for k, v in parts.items():
            logs[k] += v / accum
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    gn_d = torch.nn.utils.clip_grad_norm_(discriminators.parameters(), clip)
    gn_g = torch.nn.utils.clip_grad_norm_(g_params, clip)
    logs["grad_norm_g"], logs["grad_norm_d"] = float(gn_g), float(gn_d)
    finite = finite and math.isfinite(logs["grad_norm_g"]) and math.isfinite(logs["grad_norm_d"])
    if world > 1:  # every process must take the same decision
        flag = torch.tensor([1.0 if finite else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item() == 1.0)
    return finite, dict(logs), batch, out


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: BitTTSConfig, out_dir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
          dataset: Dataset | None = None, collate_fn: Callable | None = None, steps: int | None = None,
          resume: bool = False, device: str = "auto", progress: bool = True,
          log: Callable[[str], None] | None = None, init_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train BitTTS; returns {"step", "skipped", "history" (logged values per log step), "params", ...}.

    Args:
        cfg: model + training config (e.g. `load_preset("tiny")`). acoustic.n_symbols = 0 is taken from the
            corpus' symbol table.
        out_dir: run directory (checkpoint, config.toml, metrics.jsonl, tb/, images/).
        data_dir: prepared corpus (`bittts prepare`); or pass `dataset` (+ `collate_fn`) directly.
        steps: total optimizer steps to reach (default cfg.train.steps).
        resume: continue from `out_dir/checkpoint.pt` exactly (weights, optimizers, schedulers, data position,
            RNG states); `cfg` must match the checkpoint's config except the `BOOKKEEPING` train fields and the
            `RECIPE_CHANGES` fields (changed from the checkpoint's step on, and recorded).
        device: "auto" (CUDA if available), "cpu" or "cuda".
        init_from: start a new run from a float model's weights (an export or a checkpoint.pt; see
            `bittts.warmstart`); ignored when resuming a checkpoint.
    """
    require("train", "training (TensorBoard logs, mel spectrogram images)")
    rank, world, local_rank = _dist_env()
    own_group = world > 1 and not dist.is_initialized()
    dev = resolve_device(device, local_rank)
    if own_group:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    threads = torch.get_num_threads()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, Path(out_dir), data_dir, dataset, collate_fn, steps, resume, dev, rank, world,
                      progress, log, init_from)
    finally:
        torch.set_num_threads(threads)
        if own_group:
            dist.destroy_process_group()


def _train(cfg: BitTTSConfig, out_dir: Path, data_dir: Any, dataset: Dataset | None, collate_fn: Any,
           steps: int | None, resume: bool, dev: torch.device, rank: int, world: int, progress: bool,
           log: Callable[[str], None] | None, init_from: Any = None) -> dict[str, Any]:
    from tqdm import tqdm

    is_main = rank == 0
    say = log or (lambda msg: tqdm.write(msg))
    if not is_main:
        say = lambda msg: None  # noqa: E731
    cfg = config_from_dict(config_to_dict(cfg))  # private copy
    symbols = None
    if dataset is None:
        if data_dir is None:
            raise ValueError("train(): pass data_dir (a prepared corpus) or dataset")
        from .data import TTSDataset, collate
        dataset, collate_fn = TTSDataset(data_dir, "train"), collate
        symbols = list(dataset.meta["symbols"])
        if cfg.acoustic.n_symbols == 0:
            cfg.acoustic.n_symbols = len(symbols)
        elif cfg.acoustic.n_symbols < len(symbols):
            raise ValueError(f"acoustic.n_symbols={cfg.acoustic.n_symbols} but the corpus has {len(symbols)} symbols")
    if collate_fn is None:
        from .data import collate as collate_fn
    total_steps = int(steps if steps is not None else cfg.train.steps)
    cfg.train.steps = total_steps

    ckpt_path = out_dir / CHECKPOINT_NAME
    ckpt = None
    recipe_changes: list[dict[str, Any]] = []
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        saved = config_from_dict(ckpt["config"])
        for name in BOOKKEEPING:  # these may change between runs; everything else must match
            setattr(saved.train, name, getattr(cfg.train, name))
        changes = []
        for section, names in RECIPE_CHANGES.items():
            for name in names:
                old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
                if old != new:
                    changes.append(f"{section}.{name}: {old!r} -> {new!r}")
                    setattr(getattr(saved, section), name, new)
        diff = _config_diff(saved, cfg)
        if diff:
            raise ValueError(f"--resume: the checkpoint in {out_dir} was trained with a different config "
                             f"({'; '.join(diff)}); resume with the same preset/overrides or use a new --out")
        cfg = saved
        recipe_changes += ckpt.get("recipe_changes", [])
        if changes:
            step = int(ckpt["state"]["step"])
            recipe_changes.append({"step": step, "changes": changes})
            say(f"--resume: recipe change from step {step}: {'; '.join(changes)}")
    elif resume:
        say(f"no checkpoint in {out_dir}: starting from scratch")
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")

    init: dict[str, Any] | None = None
    if ckpt is None and init_from is not None:
        from .warmstart import load_init_weights, read_init_weights
        init = read_init_weights(init_from)
    elif init_from is not None:
        say(f"--init-from {init_from} ignored: resuming the checkpoint in {out_dir}")
    _seed_all(cfg.train.seed)  # identical initial weights in every process
    model = BitTTS(cfg)
    rebuilt: list[str] = []
    if init is not None:
        rebuilt = load_init_weights(model, init, symbols)
        symbols = symbols or init["symbols"]
        parts = sorted({k.split(".parametrizations")[0].rsplit(".", 1)[0] for k in rebuilt})
        say(f"initialized from {init['source']['file']} (step {init['source']['step']}); freshly initialized: "
            f"{', '.join(parts) or 'nothing'}")
    model = apply_quantization(model, cfg.quant).to(dev)
    discriminators = Discriminators(cfg.discriminator).to(dev)
    t = cfg.train
    opt_g = torch.optim.AdamW(model.parameters(), t.lr, betas=t.betas, eps=t.adam_eps, weight_decay=t.weight_decay)
    opt_d = torch.optim.AdamW(discriminators.parameters(), t.lr, betas=t.betas, eps=t.adam_eps,
                              weight_decay=t.weight_decay)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=t.lr_decay)
    sched_d = torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=t.lr_decay)
    state = TrainState()
    init_record = None if init is None else dict(init["source"])
    _seed_all(cfg.train.seed + rank)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        discriminators.load_state_dict(ckpt["discriminators"])
        opt_g.load_state_dict(ckpt["optim_g"])
        opt_d.load_state_dict(ckpt["optim_d"])
        sched_g.load_state_dict(ckpt["sched_g"])
        sched_d.load_state_dict(ckpt["sched_d"])
        state = TrainState(**ckpt["state"])
        if symbols is not None and ckpt.get("symbols") is not None and ckpt["symbols"] != symbols:
            raise ValueError(f"--resume: the corpus' symbol table differs from the one {ckpt_path} was trained "
                             "with; the phoneme ids would mean other phonemes. Use the original corpus")
        symbols = ckpt.get("symbols") or symbols
        init_record = ckpt.get("init")
        rngs = ckpt["rng"]
        if len(rngs) == world:
            _set_rng_state(rngs[rank])
        else:
            say(f"checkpoint was written by {len(rngs)} processes, now {world}: random streams restart")
            _seed_all(cfg.train.seed + rank + 7919 * state.step)
        say(f"resumed {ckpt_path} at step {state.step}")
        del ckpt

    batches = iter(_Batches(dataset, collate_fn, t.batch_size, rank, world, t.seed, t.num_workers, state))
    if init is not None and any(k.startswith("acoustic.aligner.") for k in rebuilt) and t.aligner_warmup:
        # before DDP wraps the model: DDP then broadcasts rank 0's warmed-up aligner to every process
        from .warmstart import warm_up_aligner
        losses = warm_up_aligner(model, batches, t.aligner_warmup, cfg, dev, progress=is_main and progress)
        init_record.update(aligner_warmup=t.aligner_warmup, aligner_loss=[round(losses[0], 4), round(losses[-1], 4)])
        say(f"aligner warm-up: {t.aligner_warmup} steps, forward-sum loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    gen: nn.Module = model
    disc: nn.Module = discriminators
    if world > 1:
        ids = [dev.index] if dev.type == "cuda" else None
        gen, disc = DDP(model, device_ids=ids), DDP(discriminators, device_ids=ids)

    counts = parameter_counts(model, discriminators)
    writer = None
    if is_main:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.toml")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "tb"))
        say(f"BitTTS preset={cfg.name} quant={cfg.quant.scheme}/{cfg.quant.scope} device={dev} processes={world} "
            f"params: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))

    def save() -> None:
        state.seconds = seconds_before + time.perf_counter() - t_start
        rngs = _gather_rng(world)  # collective: every process takes part
        if is_main:
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "version": 1, "config": config_to_dict(cfg),
                "state": dataclasses.asdict(state), "model": model.state_dict(),
                "discriminators": discriminators.state_dict(), "optim_g": opt_g.state_dict(),
                "optim_d": opt_d.state_dict(), "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(),
                "rng": rngs, "symbols": symbols, "world_size": world, "recipe_changes": recipe_changes,
                "init": init_record,
            }, ckpt_path)

    history: list[dict[str, float]] = []
    consecutive = 0
    bar = tqdm(total=total_steps, initial=state.step, disable=not (is_main and progress), dynamic_ncols=True,
               desc=f"train {cfg.name}", unit="step")
    model.train()
    discriminators.train()
    t_start, step_start, seconds_before = time.perf_counter(), state.step, state.seconds
    # a resumed run appends after the lines up to its step (a run killed after its last checkpoint logged steps
    # that are now redone); a fresh one starts the file over (a directory may hold a crashed run's log)
    if is_main and state.step:
        truncate_metrics(out_dir / "metrics.jsonl", state.step)
    metrics_file = open(out_dir / "metrics.jsonl", "a" if state.step else "w") if is_main else None  # noqa: SIM115
    try:
        while state.step < total_steps:
            finite, logs, batch, out = _train_step(gen, disc, model, discriminators, opt_g, opt_d, batches, cfg,
                                                   dev, world, state.step)
            state.step += 1
            if finite:
                opt_d.step()
                opt_g.step()
                sched_d.step()
                sched_g.step()
                consecutive = 0
            else:
                state.skipped += 1
                consecutive += 1
                opt_g.zero_grad(set_to_none=True)
                opt_d.zero_grad(set_to_none=True)
                say(f"step {state.step}: non-finite loss or gradient (loss_g={logs['loss_g']:.4g}, "
                    f"loss_d={logs['loss_d']:.4g}, grad norms {logs['grad_norm_g']:.4g}/{logs['grad_norm_d']:.4g})"
                    f"; step skipped ({consecutive} in a row)")
                if consecutive >= t.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{consecutive} consecutive steps had a non-finite loss or gradient (last at step "
                        f"{state.step}); stopping. Lower train.lr, check the corpus for broken features, or "
                        f"resume from the last checkpoint in {out_dir}")
            bar.update(1)
            bar.set_postfix(g=f"{logs['loss_g']:.3f}", d=f"{logs['loss_d']:.3f}", mel=f"{logs['mel']:.3f}",
                            dur=f"{logs['dur']:.3f}", refresh=False)
            if is_main and t.log_every and (state.step % t.log_every == 0 or state.step == total_steps):
                elapsed = time.perf_counter() - t_start
                logs.update(step=state.step, lr=sched_g.get_last_lr()[0], skipped=state.skipped,
                            steps_per_s=(state.step - step_start) / max(elapsed, 1e-9),
                            wall_s=seconds_before + elapsed)
                history.append(dict(logs))
                metrics_file.write(json.dumps(logs) + "\n")
                metrics_file.flush()
                for k, v in logs.items():
                    if k != "step":
                        group = "train/" if k in ("lr", "skipped", "steps_per_s", "wall_s") else "loss/"
                        writer.add_scalar(group + k, v, state.step)
            if is_main and t.image_every and state.step % t.image_every == 0:
                rgb = _snapshot(model, batch, out, out_dir / "images" / f"mel_{state.step:07d}.png")
                writer.add_image("mel", rgb, state.step, dataformats="HWC")
            if t.ckpt_every and state.step % t.ckpt_every == 0 and state.step < total_steps:
                save()
        save()
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - t_start
    return {"step": state.step, "skipped": state.skipped, "history": history, "params": counts,
            "seconds": elapsed, "steps_per_s": (state.step - step_start) / max(elapsed, 1e-9),
            "checkpoint": str(ckpt_path), "config": cfg}


def _config_diff(a: BitTTSConfig, b: BitTTSConfig) -> list[str]:
    da, db = config_to_dict(a), config_to_dict(b)
    out = []
    for section in da:
        if section == "name":
            continue
        for k in da[section]:
            if da[section][k] != db[section][k]:
                out.append(f"{section}.{k}: {da[section][k]!r} vs {db[section][k]!r}")
    return out
