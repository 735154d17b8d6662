"""Training the CLEVR models: an accelerate loop with EMA, CSV loss log and exactly resumable checkpoints.

The loop is ordinary DDPM training (diffusers ``DDPMScheduler``, cosine ``squaredcos_cap_v2`` schedule; ε or
v targets, :func:`training_target`) of a U-Net plus its token encoder. What needs care is **resuming bit-identically**: a run killed at
any point and restarted must end with the same weights as an uninterrupted run with the same seed. Every
source of randomness is therefore a pure function of ``(seed, step)``:

* the batch is :meth:`ClevrStream.batch(step) <interp.clevr.datasets.ClevrStream.batch>`;
* timesteps, noise and condition dropout come from a ``torch.Generator`` seeded with ``(seed, step)``;
* the learning rate is a function of ``step`` (linear warm-up, then constant — so a run stopped early is a
  valid model too).

A checkpoint holds model, EMA and AdamW state (safetensors) plus ``state.json`` (step, recipe); it is written
to a temporary folder and renamed into place, and ``latest.json`` is replaced atomically after it, so a kill
at any moment leaves the previous checkpoint intact. The CSV log is truncated to the checkpoint's step on
resume. Bit-identity needs the same thread count and machine (float reductions are order-dependent).

Multi-GPU: ``accelerate launch -m interp.clevr.cli train ...`` — each process takes batch
``step · world + rank``; gradients are averaged by accelerate's DDP wrapper.

Recipes (:data:`RECIPES`): ``exp1``, ``exp2``, ``exp3`` (the local U-Net on Exp2 data) and ``colour``, each with
a ``cpu`` profile (fits the 2-core CPU budget) and a ``gpu`` profile (bigger model, more steps).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from interp.clevr.datasets import ClevrStream


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run (saved with every checkpoint).

    Attributes:
        name: recipe name. data: dataset recipe (:data:`~interp.clevr.datasets.RECIPE_DATA`).
        arch: ``"global-coord"`` (standard ``UNet2DConditionModel`` + pixel-coordinate input channels,
            :mod:`interp.models.coord_unet`), ``"global"`` (the plain one) or ``"local"`` (:class:`ClevrLocalUNet`).
        encoder: ``"location"`` | ``"located"`` | ``"colour"``.
        unet: architecture keyword arguments (preset name and overrides for ``global``; config for ``local``).
        token_dim: token width. size: image side. batch_size / steps / lr / warmup / ema_decay: optimisation.
        p_uncond: probability of training a sample with the null condition (enables CFG and D(x|∅) probes).
        checkpoint_every: steps between checkpoints.
        prediction_type: the network's target, ``"epsilon"`` or ``"v_prediction"`` (v = √ᾱ·ε − √(1−ᾱ)·x₀;
            Salimans & Ho 2022). The CPU recipes use v: a small GroupNorm U-Net trained briefly on ε drifts in
            global colour, because at high noise x̂₀ = (x_t − √(1−ᾱ)·ε̂)/√ᾱ amplifies any error in the
            predicted per-image mean of ε, which GroupNorm makes hard to express; v needs no such division.
    """

    name: str
    data: str
    arch: str
    encoder: str
    unet: dict[str, Any] = field(default_factory=dict)
    token_dim: int = 32
    size: int = 32
    batch_size: int = 32
    steps: int = 4000
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    checkpoint_every: int = 200
    grad_clip: float = 1.0
    prediction_type: str = "epsilon"


_CPU_GLOBAL = dict(preset="tiny", attention_head_dim=2)
_GPU_GLOBAL = dict(preset="small")
_CPU_LOCAL = dict(block_out_channels=(32, 64), attention_head_dim=16, attention_radius=0.12)
_GPU_LOCAL = dict(block_out_channels=(64, 128), attention_head_dim=16, attention_radius=0.12)

RECIPES: dict[str, dict[str, Recipe]] = {
    # Sized for the 2-core CPU, one thread per run: 0.50 s/step for the global U-Net and 0.35 s/step for the
    # local one on an idle core, so exp1/exp2 take about 50 min and exp3/colour 23/33 min (measured;
    # docs/BENCHMARKS.md). The global U-Net uses 2 attention heads (head width 8–16) instead of the preset's
    # 8: on CPU, SDPA with head width 2–4 took half of each training step (0.84 s → 0.50 s). The learning
    # rate is constant after warm-up, so a run of N steps equals a longer run stopped at N (tested).
    "cpu": {
        "exp1": Recipe("exp1", "exp1", "global-coord", "location", _CPU_GLOBAL, token_dim=32, steps=6000, ema_decay=0.998, prediction_type="v_prediction"),
        "exp2": Recipe("exp2", "exp2", "global-coord", "location", _CPU_GLOBAL, token_dim=32, steps=6000, ema_decay=0.998, prediction_type="v_prediction"),
        "exp3": Recipe("exp3", "exp3", "local", "located", _CPU_LOCAL, token_dim=64, steps=4000, ema_decay=0.998, prediction_type="v_prediction"),
        "colour": Recipe("colour", "colour", "global-coord", "colour", _CPU_GLOBAL, token_dim=32, steps=4000, ema_decay=0.998, prediction_type="v_prediction"),
    },
    # One H100-class GPU: the 64×64 renderer preset and the 1.7M-parameter "small" U-Net (fp16 fits the 10 MB
    # shipping limit; "base", 10M parameters, would not). Never run yet (no GPU was lent to the sessions that
    # wrote them); a one-step smoke test of each (tests/clevr/test_train.py) keeps them buildable.
    "gpu": {
        "exp1": Recipe("exp1", "exp1", "global-coord", "location", _GPU_GLOBAL, token_dim=128, size=64, batch_size=128, steps=50_000, lr=3e-4, ema_decay=0.9995, checkpoint_every=1000, prediction_type="v_prediction"),
        "exp2": Recipe("exp2", "exp2", "global-coord", "location", _GPU_GLOBAL, token_dim=128, size=64, batch_size=128, steps=50_000, lr=3e-4, ema_decay=0.9995, checkpoint_every=1000, prediction_type="v_prediction"),
        "exp3": Recipe("exp3", "exp3", "local", "located", _GPU_LOCAL, token_dim=128, size=64, batch_size=128, steps=50_000, lr=3e-4, ema_decay=0.9995, checkpoint_every=1000, prediction_type="v_prediction"),
        "colour": Recipe("colour", "colour", "global-coord", "colour", _GPU_GLOBAL, token_dim=128, size=64, batch_size=128, steps=50_000, lr=3e-4, ema_decay=0.9995, checkpoint_every=1000, prediction_type="v_prediction"),
    },
}


def get_recipe(name: str, profile: str = "cpu", **overrides: Any) -> Recipe:
    """Recipe ``name`` of ``profile`` (``"cpu"`` or ``"gpu"``) with field overrides (e.g. ``steps=10``)."""
    if profile not in RECIPES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(RECIPES)}")
    if name not in RECIPES[profile]:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES[profile])}")
    bad = set(overrides) - set(Recipe.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown recipe fields {sorted(bad)}; valid: {sorted(Recipe.__dataclass_fields__)}")
    return replace(RECIPES[profile][name], **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------- model construction
def build_pipeline(recipe: Recipe, seed: int = 0):
    """A freshly initialised :class:`~interp.ClevrPipeline` for ``recipe`` (deterministic by ``seed``)."""
    from diffusers import DDPMScheduler

    from interp.models.clevr_colour import ColourLocationEncoder
    from interp.models.clevr import ClevrPipeline, LocationEncoder, clevr_unet
    from interp.models.clevr_local import ClevrLocalUNet, LocatedLocationEncoder

    torch.manual_seed(seed)
    if recipe.arch == "global":
        kw = dict(recipe.unet)
        preset = kw.pop("preset", "small")
        unet = clevr_unet(preset, seed=seed, sample_size=recipe.size, cross_attention_dim=recipe.token_dim, **kw)
    elif recipe.arch == "global-coord":
        from interp.models.coord_unet import CoordUNet2DConditionModel
        from interp.models.clevr import clevr_unet_config

        kw = dict(recipe.unet)
        preset = kw.pop("preset", "small")
        torch.manual_seed(seed)
        unet = CoordUNet2DConditionModel(**clevr_unet_config(preset, sample_size=recipe.size, cross_attention_dim=recipe.token_dim, **kw))
    elif recipe.arch == "local":
        unet = ClevrLocalUNet(sample_size=recipe.size, cross_attention_dim=recipe.token_dim, **recipe.unet)
    else:
        raise ValueError(f"unknown architecture {recipe.arch!r}; use 'global', 'global-coord' or 'local'")
    torch.manual_seed(seed + 1)
    encoders = {"location": LocationEncoder, "located": LocatedLocationEncoder, "colour": ColourLocationEncoder}
    if recipe.encoder not in encoders:
        raise ValueError(f"unknown encoder {recipe.encoder!r}; choose one of {sorted(encoders)}")
    encoder = encoders[recipe.encoder](dim=recipe.token_dim)
    if recipe.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction_type {recipe.prediction_type!r}; use 'epsilon' or 'v_prediction'")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=recipe.prediction_type)
    return ClevrPipeline(unet=unet, location_encoder=encoder, scheduler=scheduler)


class _Trainable(nn.Module):
    """U-Net + encoder as one module (one optimizer, one DDP wrapper); ``forward`` returns the loss."""

    def __init__(self, unet: nn.Module, encoder: nn.Module) -> None:
        super().__init__()
        self.unet, self.encoder = unet, encoder

    def forward(self, x_t: Tensor, t: Tensor, locations: Tensor, mask: Tensor, colours: Tensor, target: Tensor) -> Tensor:
        if "colour" in type(self.encoder).__name__.lower():
            tokens, tmask = self.encoder(locations, mask, colours)
        else:
            tokens, tmask = self.encoder(locations, mask)
        pred = self.unet(x_t, t, tokens, encoder_attention_mask=tmask, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred, target)


def training_target(prediction_type: str, x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """What the network learns to output for ``x_t = √ᾱ·x0 + √(1−ᾱ)·noise``: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0.

    Shapes: ``x0``, ``noise`` ``(B, C, H, W)``; ``alpha_bar`` broadcastable to them (``(B, 1, 1, 1)``).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict read from an older checkpoint, with fields added since filled by their defaults."""
    defaults = {k: f.default for k, f in Recipe.__dataclass_fields__.items() if f.default is not MISSING}
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


def _step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    # A large odd multiplier keeps (seed, step, rank) → seed injective for any realistic values.
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step) * 64 + rank + 1)


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warm-up over ``recipe.warmup`` steps, then constant."""
    return recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup))


# --------------------------------------------------------------------------- checkpoints
def _flat_optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = torch.as_tensor(v).contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(out: Path, step: int, model: nn.Module, ema: dict[str, Tensor], opt: torch.optim.Optimizer, recipe: Recipe, seed: int, wall: float, keep: int = 2) -> Path:
    """Write ``out/ckpt-STEP/`` atomically and point ``out/latest.json`` at it; keep the last ``keep``."""
    from safetensors.torch import save_file

    final = out / f"ckpt-{step:07d}"
    tmp = out / f".tmp-ckpt-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = _flat_optimizer_state(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "seed": seed, "wall_s": wall, "recipe": asdict(recipe), "optimizer": opt_meta}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(out / "latest.json", json.dumps({"checkpoint": final.name, "step": step}))
    old = sorted(p for p in out.glob("ckpt-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``out/latest.json`` points at, or ``None``."""
    pointer = Path(out) / "latest.json"
    if not pointer.exists():
        return None
    path = Path(out) / json.loads(pointer.read_text())["checkpoint"]
    return path if path.exists() else None


def _truncate_log(log: Path, step: int) -> None:
    if not log.exists():
        return
    with log.open() as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < step]
    tmp = log.with_name(log.name + ".tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, log)


# --------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    """Where a run ended: output folder, final step, final EMA pipeline folder, wall time (this process)."""

    out: Path
    step: int
    pipeline_dir: Path
    wall_s: float
    losses: list[float]


def train(
    recipe: Recipe,
    out: str | Path,
    *,
    seed: int = 0,
    threads: int | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train (or resume) ``recipe`` into ``out``.

    Args:
        recipe: what to train (:func:`get_recipe`).
        out: run folder: ``ckpt-*/``, ``latest.json``, ``loss.csv``, and at the end ``pipeline/`` (EMA weights).
        seed: seeds initialisation, data, noise and dropout.
        threads: ``torch.set_num_threads`` (default: leave as is). Resume with the same value for bit-identity.
        resume: continue from ``out/latest.json`` if present (recipe and seed must match).
        stop_after: stop (after checkpointing) once this step is reached — simulates an interruption in tests.
        progress: show a tqdm bar.
        on_step: ``callback(step, loss)`` after each step.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accel = Accelerator(cpu=not torch.cuda.is_available())
    pipe = build_pipeline(recipe, seed)
    model = _Trainable(pipe.unet, pipe.location_encoder)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    start, wall_before = 0, 0.0

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        # ``steps`` is not part of a run's identity: the learning rate is constant after warm-up, so a run
        # extended to more steps continues exactly the trajectory a longer run would have taken.
        saved = {k: v for k, v in _with_defaults(state["recipe"]).items() if k != "steps"}
        wanted = {k: v for k, v in json.loads(json.dumps(asdict(recipe))).items() if k != "steps"}
        if saved != wanted or state["seed"] != seed:
            diff = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
            raise ValueError(
                f"{out} holds a checkpoint of a different run (recipe {state['recipe']['name']!r}, seed {state['seed']}; "
                f"differs in {diff or ['seed']}); use another --out folder or pass resume=False to start over"
            )
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        ema = load_file(str(ckpt / "ema.safetensors"))
        _load_optimizer_state(opt, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
        start, wall_before = int(state["step"]), float(state.get("wall_s", 0.0))
    model, opt = accel.prepare(model, opt)
    raw_opt = getattr(opt, "optimizer", opt)
    inner = accel.unwrap_model(model)
    scheduler = pipe.scheduler
    alphas = scheduler.alphas_cumprod.to(accel.device)
    stream = ClevrStream(recipe.data, recipe.batch_size, recipe.size, seed)
    log = out / "loss.csv"
    _truncate_log(log, start)
    new_log = not log.exists()
    logf = log.open("a", newline="")
    writer = csv.writer(logf)
    if new_log:
        writer.writerow(["step", "loss", "lr", "wall_s"])
    t0 = time.time()
    losses: list[float] = []
    end = recipe.steps if stop_after is None else min(recipe.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=recipe.steps, disable=not progress or not accel.is_main_process, mininterval=10, desc=recipe.name)
    step = start
    try:
        for step in bar:
            batch = stream.batch(step * accel.num_processes + accel.process_index)
            gen = _step_generator(seed, step, accel.process_index)
            x0 = batch["images"].to(accel.device)
            B = x0.shape[0]
            t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=gen).to(accel.device)
            noise = torch.randn(x0.shape, generator=gen).to(accel.device)
            drop = (torch.rand(B, generator=gen) < recipe.p_uncond).to(accel.device)
            mask = batch["mask"].to(accel.device) & ~drop[:, None]
            ab = alphas[t].view(B, 1, 1, 1)
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            target = training_target(recipe.prediction_type, x0, noise, ab)
            for g in raw_opt.param_groups:
                g["lr"] = lr_at(recipe, step)
            loss = model(x_t, t, batch["locations"].to(accel.device), mask, batch["colours"].to(accel.device), target)
            opt.zero_grad(set_to_none=True)
            accel.backward(loss)
            if recipe.grad_clip:
                accel.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            decay = min(recipe.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in inner.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(decay).add_(v.detach().float().cpu(), alpha=1 - decay)
                    else:
                        ema[k].copy_(v)
            lv = float(loss.detach())
            losses.append(lv)
            if accel.is_main_process:
                writer.writerow([step, f"{lv:.6f}", f"{lr_at(recipe, step):.3e}", f"{wall_before + time.time() - t0:.2f}"])
                bar.set_postfix(loss=f"{lv:.4f}", refresh=False)
            if on_step:
                on_step(step, lv)
            done = step + 1
            if accel.is_main_process and (done % recipe.checkpoint_every == 0 or done == end):
                logf.flush()
                save_checkpoint(out, done, inner, ema, raw_opt, recipe, seed, wall_before + time.time() - t0)
        step = end
    finally:
        logf.close()
    wall = wall_before + time.time() - t0
    pipe_dir = out / "pipeline"
    if step >= recipe.steps and accel.is_main_process:
        export_ema_pipeline(recipe, seed, ema, pipe_dir)
    return TrainResult(out, step, pipe_dir, wall, losses)


def ema_pipeline(recipe: Recipe, seed: int, ema: dict[str, Tensor]):
    """A :class:`~interp.ClevrPipeline` holding the EMA weights ``ema`` (keys of the trainable module)."""
    pipe = build_pipeline(recipe, seed)
    model = _Trainable(pipe.unet, pipe.location_encoder)
    model.load_state_dict(ema)
    return pipe


def export_ema_pipeline(recipe: Recipe, seed: int, ema: dict[str, Tensor], dest: Path) -> Path:
    """Save the EMA weights as a pipeline folder at ``dest`` (written beside it, then renamed into place)."""
    pipe = ema_pipeline(recipe, seed, ema)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    (tmp / "recipe.json").write_text(json.dumps({"recipe": asdict(recipe), "seed": seed}, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def pipeline_from_checkpoint(run_dir: str | Path, *, ema: bool = True):
    """Load the latest checkpoint of a (possibly unfinished) run as a pipeline (EMA weights by default)."""
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected latest.json and ckpt-*/)")
    state = json.loads((ckpt / "state.json").read_text())
    rec = _with_defaults(state["recipe"])
    rec["unet"] = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["unet"].items()}
    recipe = Recipe(**rec)
    weights = load_file(str(ckpt / ("ema.safetensors" if ema else "model.safetensors")))
    pipe = ema_pipeline(recipe, state["seed"], weights)
    pipe._scorescope_recipe = recipe
    pipe._scorescope_state = state
    return pipe


def load_run_folder(path: Path, device: str = "cpu"):
    """Folder loader for :func:`interp.models.registry.load_model`: a training run's pipeline, or ``None``.

    The latest checkpoint's EMA weights (the same numbers as the exported ``pipeline/`` of a finished run).
    """
    if not (Path(path) / "latest.json").is_file():
        return None
    return pipeline_from_checkpoint(path).to(device)
