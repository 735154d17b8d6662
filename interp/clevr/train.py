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
to a uniquely named temporary folder and renamed into place, and ``latest.json`` is replaced atomically after
it, so a kill at any moment leaves the previous checkpoint intact. The CSV log is rewritten on (re)start to its
header plus the rows before the checkpoint's step. Bit-identity needs the same thread count and machine (float
reductions are order-dependent).

Nothing is lost: the run folder is claimed with :func:`interp.io.prepare_output_dir` (kind ``"clevr-train"``).
Only our own runs are resumed (marked, or made before the marker existed: ``latest.json`` plus a checkpoint
whose ``state.json`` parses); any other non-empty folder is refused unless ``overwrite=True``, and even then a
file in the way that this command did not create (``loss.csv``, ``latest.json``, ``pipeline/``, ``ckpt-*``)
is refused by name rather than replaced.

Several processes (``accelerate launch -m interp.clevr.cli train ...``, or ``torchrun``): the recipe's batch size
is the *global* batch. Every process draws the same batch ``step`` and the same timesteps, noise and dropout as
one process, and keeps its own ``batch_size / world`` rows (rank ``r``: the ``r``-th slice); accelerate's DDP
wrapper averages the gradients, which is the one-process gradient of that batch, so the loss curve (the mean
over the processes, logged by rank 0) matches one process within float tolerance. Rank 0 writes the log,
checkpoints and pipeline; a resume continues on any number of processes that divides the batch size.

Recipes (:data:`RECIPES`): ``exp1``, ``exp2``, ``exp3`` (the local U-Net on Exp2 data) and ``colour``, each with
a ``cpu`` profile (fits the 2-core CPU budget) and a ``gpu`` profile (bigger model, more steps).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from interp.clevr.datasets import ClevrStream
from interp.io import atomic_write, atomic_write_json, prepare_output_dir, read_marker

#: Marker kind of a training run folder (:func:`interp.io.prepare_output_dir`).
RUN_KIND = "clevr-train"


class RecipeError(ValueError):
    """A recipe value that cannot train anything sensible; ``option`` is the CLI option that sets it."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


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

    def __post_init__(self) -> None:
        # Refuse values that would train nothing (steps < 1), crash late (batch 0), or silently do something
        # else than asked (an EMA decay of 1 never moves; a NaN learning rate trains NaNs).
        def finite(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        rules = (
            ("steps", integer(self.steps) and self.steps >= 1, "an integer >= 1"),
            ("batch_size", integer(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            ("checkpoint_every", integer(self.checkpoint_every) and self.checkpoint_every >= 1, "an integer >= 1"),
            ("warmup", integer(self.warmup) and self.warmup >= 0, "an integer >= 0"),
            ("size", integer(self.size) and self.size >= 8, "an integer >= 8 (pixels)"),
            ("token_dim", integer(self.token_dim) and self.token_dim >= 1, "an integer >= 1"),
            ("lr", finite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("ema_decay", finite(self.ema_decay) and 0 <= self.ema_decay < 1, "in [0, 1) (1 would never update the EMA)"),
            ("p_uncond", finite(self.p_uncond) and 0 <= self.p_uncond < 1, "in [0, 1)"),
            ("grad_clip", finite(self.grad_clip) and self.grad_clip >= 0, "a finite number >= 0 (0: no clipping)"),
        )
        for name, ok, rule in rules:
            if not ok:
                option = "--" + name.replace("_", "-")
                raise RecipeError(f"{name} ({option}) must be {rule}, got {getattr(self, name)!r}", option)


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
    """Recipe ``name`` of ``profile`` (``"cpu"`` or ``"gpu"``) with field overrides (e.g. ``steps=10``).

    ``None`` overrides are ignored (unset CLI options). Raises :class:`RecipeError` (a ``ValueError``) naming the
    field and its CLI option for an unknown name or a value that cannot train (``steps=0``, ``lr=-1``, ...).
    """
    if profile not in RECIPES:
        raise RecipeError(f"unknown profile {profile!r}; choose one of {sorted(RECIPES)}", "--profile")
    if name not in RECIPES[profile]:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES[profile])}", "--recipe")
    bad = set(overrides) - set(Recipe.__dataclass_fields__)
    if bad:
        raise RecipeError(f"unknown recipe fields {sorted(bad)}; valid: {sorted(Recipe.__dataclass_fields__)}")
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


#: Names of the checkpoint folders this module writes (``ckpt-0000200``); nothing else is ever pruned.
_CKPT_NAME = re.compile(r"ckpt-\d{7}")
#: Header of ``loss.csv``.
LOG_HEADER = ["step", "loss", "lr", "wall_s"]


def _folder_mode() -> int:
    # mkdtemp makes 0o700 folders; a checkpoint or exported pipeline should get an ordinary folder's mode
    # (0o777 minus the umask, like os.mkdir). os.umask can only be read by setting it: restore at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def _new_temp_folder(dest: Path) -> Path:
    """A fresh, uniquely named hidden folder beside ``dest`` (ours alone: safe to delete on failure)."""
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))


def swap_in_folder(tmp: Path, dest: Path) -> Path:
    """Rename the finished folder ``tmp`` to ``dest``, replacing a previous ``dest`` that the caller owns.

    The previous folder is first renamed aside (to a fresh temporary name), then deleted: only the folder
    the caller asked to replace is ever removed. ``dest`` must not be a file or a symlink.
    """
    os.chmod(tmp, _folder_mode())
    if not os.path.lexists(dest):
        os.replace(tmp, dest)
        return dest
    if dest.is_symlink() or not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder written by this command; move it away")
    aside = _new_temp_folder(dest)
    os.replace(dest, aside)  # renaming a folder onto an empty folder is allowed (POSIX)
    os.replace(tmp, dest)
    shutil.rmtree(aside)
    return dest


def save_checkpoint(out: Path, step: int, model: nn.Module, ema: dict[str, Tensor], opt: torch.optim.Optimizer, recipe: Recipe, seed: int, wall: float, keep: int = 2) -> Path:
    """Write ``out/ckpt-STEP/`` atomically and point ``out/latest.json`` at it; keep the last ``keep``.

    Only folders named like this function's checkpoints (``ckpt-`` and seven digits) are ever pruned.
    """
    from safetensors.torch import save_file

    out = Path(out)
    final = out / f"ckpt-{step:07d}"
    tmp = _new_temp_folder(final)
    try:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = _flat_optimizer_state(opt)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "state.json", {"step": step, "seed": seed, "wall_s": wall, "recipe": asdict(recipe), "optimizer": opt_meta})
    except BaseException:
        shutil.rmtree(tmp)  # the temporary folder this call created, nothing else
        raise
    swap_in_folder(tmp, final)
    atomic_write_json(out / "latest.json", {"checkpoint": final.name, "step": step}, indent=None)
    old = sorted(p for p in out.iterdir() if _CKPT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p)
    return final


#: Sub-folder of a run that holds the EMA snapshots written with ``snapshot_every`` (never pruned).
SNAPSHOT_DIR = "snapshots"
_SNAPSHOT_NAME = re.compile(r"step-(\d{7})")


def snapshot_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, folder), ...]`` of the EMA pipeline snapshots of a run, by step (empty when there are none).

    A snapshot is the exported EMA pipeline at that step (``OUT/snapshots/step-0000500/``), loadable with
    :func:`interp.load_model` like any pipeline folder; half-written ones never appear (atomic rename).
    """
    root = Path(run_dir) / SNAPSHOT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _SNAPSHOT_NAME.fullmatch(p.name)
        if m and _is_exported_pipeline(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``out/latest.json`` points at, or ``None`` when there is no ``latest.json``.

    Raises:
        FileNotFoundError: ``latest.json`` points at a checkpoint that is missing (or is unreadable): resuming
            from scratch silently would be wrong.
    """
    pointer = Path(out) / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError) as err:
        raise FileNotFoundError(f"{pointer} is unreadable ({err!r}); delete it to start the run over") from None
    path = Path(out) / str(name)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(
            f"{pointer} points at {path.name}, which is missing or incomplete; restore it, or start over with "
            "--fresh (resume=False)"
        )
    return path


def _is_legacy_run(out: Path) -> bool:
    """A run written before the folder marker existed: ``latest.json`` plus a checkpoint whose state parses."""
    try:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            return False
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):  # FileNotFoundError is an OSError; JSONDecodeError a ValueError
        return False
    return isinstance(state, dict) and {"step", "seed", "recipe"} <= set(state)


def _is_exported_pipeline(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / "model_index.json").is_file() and (folder / "recipe.json").is_file()


def _our_entries(out: Path) -> list[str]:
    """Entries of ``out`` that this command writes (and would replace or append to)."""
    names = {"loss.csv", "latest.json", "pipeline", SNAPSHOT_DIR}
    return sorted(p.name for p in out.iterdir() if p.name in names or _CKPT_NAME.fullmatch(p.name))


def claim_run_folder(out: str | Path, recipe: Recipe, seed: int = 0, *, resume: bool = True, overwrite: bool = False) -> Path | None:
    """Check and claim the run folder ``out`` for ``recipe``; return the checkpoint to resume from (or ``None``).

    Cheap (reads a few small files): call it before building anything, so a wrong folder fails at once.

    * A missing or empty folder, or one of our runs (marked ``"clevr-train"``, or a pre-marker run with
      ``latest.json`` and a parseable checkpoint): accepted. With ``resume``, its checkpoint must belong to the
      same recipe and seed (``steps`` may grow, never shrink below the checkpoint's step).
    * Any other non-empty folder: ``FileExistsError`` naming ``--overwrite``. With ``overwrite=True`` it is
      claimed, but if it already holds a ``loss.csv``, ``latest.json``, ``pipeline`` or ``ckpt-*`` that this
      command did not write, that is refused by name too: nothing we did not create is replaced.

    Raises:
        FileExistsError: the folder is not ours (see above), or ``out`` is a file.
        FileNotFoundError: our run's ``latest.json`` points at a missing checkpoint.
        ValueError: the checkpoint belongs to a different run, or is past ``recipe.steps``; or ``seed < 0``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed (--seed) must be an integer >= 0, got {seed!r}")
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; pass a folder path for the run")
    marker = read_marker(out) if out.is_dir() else None
    ours = (marker is not None and marker.get("kind") == RUN_KIND) or (out.is_dir() and marker is None and _is_legacy_run(out))
    if not ours and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            prepare_output_dir(out, RUN_KIND)  # raises the standard "not empty ... --overwrite" error
        in_the_way = _our_entries(out)
        if in_the_way:
            raise FileExistsError(
                f"{out} already holds {', '.join(in_the_way)}, not written by `clevr train`; --overwrite never "
                "replaces files this command did not create: move them away or choose another --out folder"
            )
    pipe_dir = out / "pipeline"
    if os.path.lexists(pipe_dir) and not _is_exported_pipeline(pipe_dir):
        # Checked now, not after hours of training: the export at the end would have to replace it.
        raise FileExistsError(f"{pipe_dir} exists and is not a pipeline exported by `clevr train`; move it away")
    # A pre-marker run of ours gets the marker now (overwrite=True: it is ours, nothing is deleted).
    prepare_output_dir(out, RUN_KIND, overwrite=overwrite or ours)
    if not resume:
        return None
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    state = json.loads((ckpt / "state.json").read_text())
    # ``steps`` is not part of a run's identity: the learning rate is constant after warm-up, so a run
    # extended to more steps continues exactly the trajectory a longer run would have taken.
    saved = {k: v for k, v in _with_defaults(state["recipe"]).items() if k != "steps"}
    wanted = {k: v for k, v in json.loads(json.dumps(asdict(recipe))).items() if k != "steps"}
    if saved != wanted or state["seed"] != seed:
        diff = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        raise ValueError(
            f"{out} holds a checkpoint of a different run (recipe {state['recipe']['name']!r}, seed {state['seed']}; "
            f"differs in {diff or ['seed']}); use another --out folder or pass --fresh (resume=False) to start over"
        )
    if int(state["step"]) > recipe.steps:
        raise ValueError(
            f"{out} is already at step {state['step']}, past --steps {recipe.steps}: pass --steps >= {state['step']} "
            "to continue it, or --fresh (resume=False) to start over"
        )
    return ckpt


def _is_log_row(row: list[str]) -> bool:
    if len(row) != len(LOG_HEADER):
        return False
    try:
        int(row[0]), float(row[1])
    except ValueError:
        return False
    return True


def _truncate_log(log: Path, step: int) -> None:
    """Rewrite ``log`` as the header plus its rows before ``step`` (creating it when missing or empty).

    A kill can leave the log empty (before the header was flushed) or with a half-written last row; both are
    dropped here, so the log always starts with its header.
    """
    rows: list[list[str]] = []
    if log.exists():
        with log.open(newline="") as f:
            rows = list(csv.reader(f))
        if rows and rows[0] != LOG_HEADER and not _is_log_row(rows[0]):
            raise FileExistsError(f"{log} was not written by `clevr train` (header {rows[0]}); move it away")
    keep = [r for r in rows if _is_log_row(r) and int(r[0]) < step]
    buf = io.StringIO()
    csv.writer(buf).writerows([LOG_HEADER, *keep])
    atomic_write(log, buf.getvalue())


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
    overwrite: bool = False,
    snapshot_every: int | None = None,
) -> TrainResult:
    """Train (or resume) ``recipe`` into ``out``.

    Args:
        recipe: what to train (:func:`get_recipe`).
        out: run folder: ``ckpt-*/``, ``latest.json``, ``loss.csv``, and at the end ``pipeline/`` (EMA weights).
            Claimed by :func:`claim_run_folder`: a missing or empty folder, or one of our runs.
        seed: seeds initialisation, data, noise and dropout (>= 0).
        threads: ``torch.set_num_threads`` (>= 1; default: leave as is). Resume with the same value for
            bit-identity.
        resume: continue from ``out/latest.json`` if present (recipe and seed must match); ``False`` starts
            our run over (its checkpoints are replaced as the new run writes its own).
        stop_after: stop (after checkpointing) once this step is reached — simulates an interruption in tests.
        progress: show a tqdm bar.
        on_step: ``callback(step, loss)`` after each step.
        overwrite: write into a non-empty folder that is not one of our runs (never replacing a file we did
            not create: see :func:`claim_run_folder`).
        snapshot_every: also export the EMA pipeline every this many steps to ``out/snapshots/step-NNNNNNN/``
            (kept, never pruned; see :func:`snapshot_folders`), for studies of a model through training
            (``scorescope clevr track``). Not part of the recipe: it changes no trained number, and a resumed
            run may add or drop it.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads (--threads) must be an integer >= 1, got {threads!r}")
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after!r}")
    if snapshot_every is not None and (not isinstance(snapshot_every, int) or isinstance(snapshot_every, bool) or snapshot_every < 1):
        raise ValueError(f"snapshot_every (--snapshot-every) must be an integer >= 1, got {snapshot_every!r}")
    out = Path(out)
    from interp.distributed import detect_env

    several = detect_env().world_size > 1
    if not several:
        # Every check happens here, before the model is built: a wrong folder fails in milliseconds.
        ckpt = claim_run_folder(out, recipe, seed, resume=resume, overwrite=overwrite)
    snap_root = out / SNAPSHOT_DIR
    if os.path.lexists(snap_root) and (snap_root.is_symlink() or not snap_root.is_dir()):
        raise FileExistsError(f"{snap_root} exists and is not a snapshot folder written by `clevr train`; move it away")
    if threads:
        torch.set_num_threads(threads)
    accel = Accelerator(cpu=not torch.cuda.is_available())
    if several:
        # Rank 0 claims the folder first (two claims at once would each see the other's marker half-written);
        # the others then find it ours and read the same checkpoint.
        with accel.main_process_first():
            ckpt = claim_run_folder(out, recipe, seed, resume=resume, overwrite=overwrite)
    world, rank = accel.num_processes, accel.process_index
    if recipe.batch_size % world:
        raise RecipeError(f"the batch size {recipe.batch_size} (--batch-size) is the global batch and must split evenly "
                          f"over {world} processes; use a multiple of {world}", "--batch-size")
    lo, hi = rank * recipe.batch_size // world, (rank + 1) * recipe.batch_size // world
    if not resume and accel.is_main_process and (out / "latest.json").exists():
        # Starting our run over: a kill before the new run's first checkpoint must not resume the old one.
        os.unlink(out / "latest.json")
    pipe = build_pipeline(recipe, seed)
    model = _Trainable(pipe.unet, pipe.location_encoder)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    start, wall_before = 0, 0.0
    if ckpt is not None:  # same recipe and seed: checked by claim_run_folder
        state = json.loads((ckpt / "state.json").read_text())
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
    if accel.is_main_process:
        # Header plus the rows before ``start``, written atomically: also right after a kill that left the log
        # empty or with rows past the checkpoint.
        _truncate_log(log, start)
    logf = log.open("a", newline="") if accel.is_main_process else open(os.devnull, "w", newline="")
    writer = csv.writer(logf)
    t0 = time.time()
    losses: list[float] = []
    end = recipe.steps if stop_after is None else min(recipe.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=recipe.steps, disable=not progress or not accel.is_main_process, mininterval=10, desc=recipe.name)
    step = start
    # Training needs gradients whatever the caller's grad mode is (a caller inside ``torch.no_grad()``, or a
    # suspended generator that left it disabled on this thread, would otherwise fail with "does not require grad").
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    try:
        for step in bar:
            # Every process draws the whole global batch and its noise exactly as one process does, then keeps its
            # rows: the averaged gradient is the one-process gradient (one process: rows 0…B, bit-identical).
            batch = stream.batch(step)
            gen = _step_generator(seed, step)
            full = batch["images"].shape[0]
            t = torch.randint(0, scheduler.config.num_train_timesteps, (full,), generator=gen)
            noise = torch.randn(batch["images"].shape, generator=gen)
            drop = torch.rand(full, generator=gen) < recipe.p_uncond
            rows = slice(lo, hi)
            x0 = batch["images"][rows].to(accel.device)
            B = x0.shape[0]
            t, noise, drop = t[rows].to(accel.device), noise[rows].to(accel.device), drop[rows].to(accel.device)
            mask = batch["mask"][rows].to(accel.device) & ~drop[:, None]
            ab = alphas[t].view(B, 1, 1, 1)
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            target = training_target(recipe.prediction_type, x0, noise, ab)
            for g in raw_opt.param_groups:
                g["lr"] = lr_at(recipe, step)
            loss = model(x_t, t, batch["locations"][rows].to(accel.device), mask, batch["colours"][rows].to(accel.device), target)
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
            # the global batch's loss: the mean over equal shards of their mean losses
            lv = float(loss.detach()) if world == 1 else float(accel.reduce(loss.detach(), reduction="mean"))
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
            if accel.is_main_process and snapshot_every and done % snapshot_every == 0:
                snap_root.mkdir(exist_ok=True)
                # A resumed run rewrites a snapshot past its checkpoint with the same numbers (bit-identical resume).
                export_ema_pipeline(recipe, seed, ema, snap_root / f"step-{done:07d}")
        step = max(start, end)
    finally:
        torch.set_grad_enabled(grad_was)
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
    """Save the EMA weights as a pipeline folder at ``dest`` (written beside it, then renamed into place).

    A previous ``dest`` is replaced only if it is an earlier export (``model_index.json`` and ``recipe.json``);
    anything else there raises ``FileExistsError`` before any work.
    """
    dest = Path(dest)
    if os.path.lexists(dest) and not _is_exported_pipeline(dest):
        raise FileExistsError(f"{dest} exists and is not a pipeline exported by `clevr train`; move it away")
    pipe = ema_pipeline(recipe, seed, ema)
    tmp = _new_temp_folder(dest)
    try:
        pipe.save_pretrained(str(tmp))
        atomic_write_json(tmp / "recipe.json", {"recipe": asdict(recipe), "seed": seed})
    except BaseException:
        shutil.rmtree(tmp)  # the temporary folder this call created, nothing else
        raise
    return swap_in_folder(tmp, dest)


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
