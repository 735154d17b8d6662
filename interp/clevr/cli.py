"""``scorescope clevr``: train the CLEVR models and measure their length generalisation.

    scorescope clevr train --recipe exp1 --out runs/exp1            # CPU profile, resumable
    accelerate launch -m interp.clevr.cli train --recipe exp1 --profile gpu --out runs/exp1-gpu
    scorescope clevr eval --model exp1 --counts 0-10 --n 64 --seed 0 --json out.json
    torchrun --nproc_per_node=4 $(which scorescope) clevr eval --model exp1 --json out.json   # units split across 4
    scorescope clevr compare exp1.json exp2.json exp3.json --metric recall --out recall.png
    scorescope clevr render --out scenes.png --counts 0-10           # look at the training distribution

``--model`` accepts a shipped name (exp1, exp2, exp3, colour), ``tiny-clevr``, a pipeline folder or a
training run folder (its latest EMA checkpoint).

``train --out`` resumes only its own runs; any other non-empty folder needs ``--overwrite``, and even then a
``loss.csv``, ``latest.json``, ``pipeline/`` or ``ckpt-*`` it did not write is refused, never replaced. Every
option is checked (and every output path tested for writability) before any training or sampling starts; a
bad one is reported as one usage error naming the option.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="The CLEVR world: train models, evaluate length generalisation.\n\n"
                  "Example: scorescope clevr eval --model exp1 --counts 1-10 --n 64 --json exp1.json", no_args_is_help=True, add_completion=False)


def _bad(err: Exception, option: str | None) -> typer.BadParameter:
    """One clean CLI error line for ``err``, naming ``option`` (no traceback)."""
    return typer.BadParameter(str(err), param_hint=f"'{option}'" if option else None)


def _at_least(value: int | None, minimum: int, option: str, what: str) -> None:
    if value is not None and value < minimum:
        raise typer.BadParameter(f"{what} must be >= {minimum}, got {value}", param_hint=f"'{option}'")


@app.command()
def train(
    recipe: str = typer.Option(..., help="exp1 | exp2 | exp3 | colour"),
    out: Path = typer.Option(..., help="Run folder (checkpoints, loss.csv, final pipeline/)."),
    profile: str = typer.Option("cpu", help="cpu (small, minutes) | gpu (bigger model, more steps)."),
    seed: int = typer.Option(0, help="Seed for initialisation, data, noise and dropout (>= 0)."),
    steps: int = typer.Option(None, help="Override the recipe's number of steps (>= 1)."),
    batch_size: int = typer.Option(None, help="Override the recipe's batch size (>= 1)."),
    lr: float = typer.Option(None, help="Override the recipe's learning rate (> 0)."),
    ema_decay: float = typer.Option(None, help="Override the recipe's EMA decay (in [0, 1))."),
    checkpoint_every: int = typer.Option(None, help="Override the steps between checkpoints (>= 1)."),
    threads: int = typer.Option(None, help="torch.set_num_threads (>= 1; resume with the same value for bit-identical results)."),
    fresh: bool = typer.Option(False, help="Ignore an existing checkpoint of this run in OUT and start it over."),
    snapshot_every: int = typer.Option(None, help="Also keep the EMA pipeline every N steps in OUT/snapshots/ (for `clevr track`)."),
    overwrite: bool = typer.Option(
        False, help="Write into a non-empty OUT that is not a clevr run (its own files are never deleted or replaced)."
    ),
) -> None:
    """Train (or resume) a CLEVR model; EMA weights end up in OUT/pipeline.

    Example: scorescope clevr train --recipe exp1 --out runs/exp1 --steps 4000
    """
    from interp.clevr.train import RecipeError, claim_run_folder, get_recipe
    from interp.clevr.train import train as run

    _at_least(seed, 0, "--seed", "seed")
    _at_least(threads, 1, "--threads", "threads")
    _at_least(snapshot_every, 1, "--snapshot-every", "snapshot interval")
    try:
        rec = get_recipe(recipe, profile, steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, checkpoint_every=checkpoint_every)
    except RecipeError as err:
        raise _bad(err, err.option) from None
    try:
        # Checked before the model is built, so a wrong folder fails at once (train() checks again, cheaply).
        claim_run_folder(out, rec, seed, resume=not fresh, overwrite=overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise _bad(err, "--out") from None
    res = run(rec, out, seed=seed, threads=threads, resume=not fresh, overwrite=overwrite, snapshot_every=snapshot_every)
    typer.echo(f"trained {rec.name} to step {res.step} in {res.wall_s:.0f} s; pipeline: {res.pipeline_dir}")


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="exp1 | exp2 | exp3 | colour | tiny-clevr | pipeline folder | run folder."),
    counts: str = typer.Option("0-10", help="Requested object counts, e.g. 0-10 or 1,3,6."),
    n: int = typer.Option(64, help="Scenes per count (>= 1)."),
    seed: int = typer.Option(0, help="Seed of the requested locations and the sampling noise (>= 0)."),
    steps: int = typer.Option(25, help="DDIM steps (>= 1)."),
    guidance: float = typer.Option(None, help="Classifier-free guidance scale (default: none)."),
    json_out: Path = typer.Option(Path("clevr_eval.json"), "--json", help="Where to write the per-k table."),
    figure: Path = typer.Option(None, help="Accuracy-vs-k figure (default: next to the JSON)."),
    grid: Path = typer.Option(None, help="Sample grid image (default: next to the JSON)."),
    threads: int = typer.Option(None, help="torch.set_num_threads (>= 1)."),
    parts: Path = typer.Option(
        None, help="Folder of per-(k, batch) part files: the evaluation resumes from it (default: none on one "
        "process; NAME_parts/ next to the JSON under torchrun)."
    ),
    device: str = typer.Option(None, help="cpu | cuda (default: cpu on one process; cuda:LOCAL_RANK under torchrun when present)."),
) -> None:
    """Length generalisation: count accuracy, recall, precision, placement accuracy and mean count for each requested k.

    Example: scorescope clevr eval --model exp1 --counts 0-10 --n 64 --seed 0 --json exp1.json
    """
    import torch

    from interp.clevr.evaluate import OptionError, check_eval_options, evaluate_length, format_table, output_paths, parse_counts, write_outputs
    from interp.models.registry import load_model

    _at_least(threads, 1, "--threads", "threads")
    try:
        ks = parse_counts(counts)
    except ValueError as err:
        raise _bad(err, "--counts") from None
    try:
        check_eval_options(n=n, seed=seed, steps=steps, guidance_scale=guidance)
        # The outputs are checked before any sampling: an unwritable path must not cost a whole evaluation.
        paths = output_paths(json_out, figure_path=figure, grid_path=grid)
    except OptionError as err:
        raise _bad(err, err.option) from None
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise _bad(ValueError(f"device must be cpu or cuda, got {device!r}"), "--device")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise _bad(ValueError("no CUDA device is available; use --device cpu"), "--device")
    if threads:
        torch.set_num_threads(threads)
    from interp.distributed import RankAborted, distributed

    with distributed() as dist:
        if parts is None and dist.world_size > 1:
            parts = paths["json"].with_name(paths["json"].with_suffix("").name + "_parts")
        where = dist.device(device) if (device is not None or dist.world_size > 1) else "cpu"
        try:
            pipe = load_model(model, device=where).pipeline
        except (ValueError, FileNotFoundError) as err:
            raise _bad(err, "--model") from None
        try:
            result = evaluate_length(pipe, ks, n=n, seed=seed, steps=steps, guidance_scale=guidance, model_name=model,
                                     parts=parts, dist=dist, progress=typer.echo if parts is not None else None)
        except FileExistsError as err:
            raise _bad(err, "--parts") from None
        except OptionError as err:
            raise _bad(err, err.option) from None
        except RankAborted:
            raise typer.Exit(1) from None  # rank 0 reports the reason
        if not dist.is_main:  # rank 0 writes the table and figures
            return
    paths = write_outputs(result, paths["json"], figure_path=paths["figure"], grid_path=paths["grid"])
    typer.echo(format_table(result))
    typer.echo(f"wrote {paths['json']}, {paths['figure']}, {paths['grid']}")


@app.command()
def compare(
    results: list[Path] = typer.Argument(..., help="JSON files written by `scorescope clevr eval`."),
    metric: str = typer.Option("count_acc", help="count_acc | recall | precision | placement_acc | mean_count | mean_extra | colour_acc."),
    out: Path = typer.Option(Path("clevr_compare.png"), help="Where to write the figure."),
) -> None:
    """Plot one metric against k for several evaluated models (one line each, training range shaded).

    Example: scorescope clevr compare exp1.json exp2.json exp3.json --metric recall --out recall.png
    """
    import json

    from interp.clevr.evaluate import compare_figure
    from interp.io import check_writable_file

    try:
        check_writable_file(out, what="figure")
    except ValueError as err:
        raise _bad(err, "--out") from None
    loaded: dict[str, dict] = {}
    for path in results:
        if not path.is_file():
            raise _bad(FileNotFoundError(f"{path} is not a file; write it with `scorescope clevr eval --json {path}`"), "RESULTS")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise _bad(ValueError(f"{path} is not JSON ({err}); is it a `scorescope clevr eval` output?"), "RESULTS") from None
        if not isinstance(data, dict) or "per_k" not in data:
            raise _bad(ValueError(f"{path} has no 'per_k' table; is it a `scorescope clevr eval` output?"), "RESULTS")
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        label = str(meta.get("model", path.stem))
        if label in loaded:
            # Two results of the same model (e.g. two seeds) would otherwise collapse into one line.
            label = f"{label} ({path})"
        if label in loaded:
            raise _bad(ValueError(f"{path} is given twice"), "RESULTS")
        loaded[label] = data
    try:
        compare_figure(loaded, out, metric=metric)
    except ValueError as err:
        raise _bad(err, "--metric") from None
    typer.echo(f"wrote {out}")


@app.command()
def render(
    out: Path = typer.Option(Path("clevr_scenes.png"), help="PNG grid of rendered scenes."),
    counts: str = typer.Option("0-10", help="Object counts, one row each."),
    per_row: int = typer.Option(6, help="Scenes per count."),
    size: int = typer.Option(64, help="Image side in pixels (>= 8; the models use 32 or 64)."),
    seed: int = typer.Option(0, help="Scene seed."),
) -> None:
    """Render example scenes (one row per object count) to a PNG grid.

    Example: scorescope clevr render --counts 0-10 --out scenes.png
    """
    import numpy as np
    import torch

    from interp.clevr.evaluate import parse_counts, sample_grid
    from interp.clevr.render import render_random
    from interp.io import check_writable_file

    try:
        ks = parse_counts(counts)
    except ValueError as err:
        raise _bad(err, "--counts") from None
    _at_least(per_row, 1, "--per-row", "scenes per count")
    _at_least(size, 8, "--size", "the image side (pixels)")
    _at_least(seed, 0, "--seed", "seed")
    try:
        check_writable_file(out, what="PNG grid")
    except ValueError as err:
        raise _bad(err, "--out") from None
    r = render_random(seed, np.repeat(ks, per_row), size)
    imgs = torch.from_numpy(r.images).reshape(len(ks), per_row, 3, size, size)
    sample_grid({"_images": imgs}, out, scale=2)
    typer.echo(f"wrote {out}")


if __name__ == "__main__":  # `accelerate launch -m interp.clevr.cli train ...`
    app()
