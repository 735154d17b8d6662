"""``scorescope clevr``: train the CLEVR models and measure their length generalisation.

    scorescope clevr train --recipe exp1 --out runs/exp1            # CPU profile, resumable
    accelerate launch -m interp.clevr.cli train --recipe exp1 --profile gpu --out runs/exp1-gpu
    scorescope clevr eval --model exp1 --counts 0-10 --n 64 --seed 0 --json out.json
    scorescope clevr compare exp1.json exp2.json exp3.json --metric recall --out recall.png
    scorescope clevr render --out scenes.png --counts 0-10           # look at the training distribution

``--model`` accepts a shipped name (exp1, exp2, exp3, colour), ``tiny-clevr``, a pipeline folder or a
training run folder (its latest EMA checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="The CLEVR world: train models, evaluate length generalisation.", no_args_is_help=True, add_completion=False)


@app.command()
def train(
    recipe: str = typer.Option(..., help="exp1 | exp2 | exp3 | colour"),
    out: Path = typer.Option(..., help="Run folder (checkpoints, loss.csv, final pipeline/)."),
    profile: str = typer.Option("cpu", help="cpu (small, minutes) | gpu (bigger model, more steps)."),
    seed: int = typer.Option(0, help="Seed for initialisation, data, noise and dropout."),
    steps: int = typer.Option(None, help="Override the recipe's number of steps."),
    batch_size: int = typer.Option(None, help="Override the recipe's batch size."),
    threads: int = typer.Option(None, help="torch.set_num_threads (resume with the same value for bit-identical results)."),
    fresh: bool = typer.Option(False, help="Ignore an existing checkpoint in OUT and start over."),
) -> None:
    """Train (or resume) a CLEVR model; EMA weights end up in OUT/pipeline."""
    from interp.clevr.train import get_recipe
    from interp.clevr.train import train as run

    try:
        rec = get_recipe(recipe, profile, steps=steps, batch_size=batch_size)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    res = run(rec, out, seed=seed, threads=threads, resume=not fresh)
    typer.echo(f"trained {rec.name} to step {res.step} in {res.wall_s:.0f} s; pipeline: {res.pipeline_dir}")


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="exp1 | exp2 | exp3 | colour | tiny-clevr | pipeline folder | run folder."),
    counts: str = typer.Option("0-10", help="Requested object counts, e.g. 0-10 or 1,3,6."),
    n: int = typer.Option(64, help="Scenes per count."),
    seed: int = typer.Option(0, help="Seed of the requested locations and the sampling noise."),
    steps: int = typer.Option(25, help="DDIM steps."),
    guidance: float = typer.Option(None, help="Classifier-free guidance scale (default: none)."),
    json_out: Path = typer.Option(Path("clevr_eval.json"), "--json", help="Where to write the per-k table."),
    figure: Path = typer.Option(None, help="Accuracy-vs-k figure (default: next to the JSON)."),
    grid: Path = typer.Option(None, help="Sample grid image (default: next to the JSON)."),
    threads: int = typer.Option(None, help="torch.set_num_threads."),
) -> None:
    """Length generalisation: count accuracy, recall, precision and mean count for each requested k."""
    import torch

    from interp.models.registry import load_model
    from interp.clevr.evaluate import evaluate_length, format_table, parse_counts, write_outputs

    if threads:
        torch.set_num_threads(threads)
    try:
        ks = parse_counts(counts)
        pipe = load_model(model).pipeline
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from None
    result = evaluate_length(pipe, ks, n=n, seed=seed, steps=steps, guidance_scale=guidance, model_name=model)
    paths = write_outputs(result, json_out, figure_path=figure, grid_path=grid)
    typer.echo(format_table(result))
    typer.echo(f"wrote {paths['json']}, {paths['figure']}, {paths['grid']}")


@app.command()
def compare(
    results: list[Path] = typer.Argument(..., help="JSON files written by `scorescope clevr eval`."),
    metric: str = typer.Option("count_acc", help="count_acc | recall | precision | mean_count | mean_extra | colour_acc."),
    out: Path = typer.Option(Path("clevr_compare.png"), help="Where to write the figure."),
) -> None:
    """Plot one metric against k for several evaluated models (one line each, training range shaded)."""
    import json

    from interp.clevr.evaluate import compare_figure

    loaded = {}
    for path in results:
        if not path.exists():
            raise typer.BadParameter(f"{path} does not exist; write it with `scorescope clevr eval --json {path}`")
        data = json.loads(path.read_text())
        if "per_k" not in data:
            raise typer.BadParameter(f"{path} has no 'per_k' table; is it a `scorescope clevr eval` output?")
        loaded[data.get("meta", {}).get("model", path.stem)] = data
    try:
        compare_figure(loaded, out, metric=metric)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"wrote {out}")


@app.command()
def render(
    out: Path = typer.Option(Path("clevr_scenes.png"), help="PNG grid of rendered scenes."),
    counts: str = typer.Option("0-10", help="Object counts, one row each."),
    per_row: int = typer.Option(6, help="Scenes per count."),
    size: int = typer.Option(64, help="Image side (32 or 64)."),
    seed: int = typer.Option(0, help="Scene seed."),
) -> None:
    """Render example scenes (one row per object count) to a PNG grid."""
    import numpy as np
    import torch

    from interp.clevr.evaluate import parse_counts, sample_grid
    from interp.clevr.render import render_random

    try:
        ks = parse_counts(counts)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    r = render_random(seed, np.repeat(ks, per_row), size)
    imgs = torch.from_numpy(r.images).reshape(len(ks), per_row, 3, size, size)
    sample_grid({"_images": imgs}, out, scale=2)
    typer.echo(f"wrote {out}")


if __name__ == "__main__":  # `accelerate launch -m interp.clevr.cli train ...`
    app()
