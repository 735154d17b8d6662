"""``scorescope features sdxl``: style + content conditional locality, in latent space and at each U-Net layer.

    scorescope features sdxl --model stabilityai/stable-diffusion-xl-base-1.0 --out runs/sdxl --json sdxl.json
    scorescope features sdxl --model runs/my-sdxl-folder --out runs/sdxl --style 'an ukiyo-e print' --content 'a boat'
    scorescope features sdxl --model tiny-sdxl --out runs/tiny --no-builtin --style 'a watercolor painting' \\
        --content 'a cat' --content 'a dog' --t 0.5 --seeds 1 --sites '*attn2'
    scorescope features sdxl --out runs/plan --plan        # U-Net calls and bytes of the full-size run; loads nothing

The work is done by :mod:`scorescope.experiments.sdxl_features`; this module only parses and checks options.
Every option is checked before any weights load, and a bad one is reported as one usage error naming it.
"""

from __future__ import annotations

from pathlib import Path

import typer

DTYPES = ("float16", "bfloat16", "float32")


def _bad(err: Exception, option: str) -> typer.BadParameter:
    return typer.BadParameter(" ".join(str(err).split()), param_hint=f"'{option}'")


def _levels(text: str) -> list[float]:
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise _bad(ValueError(f"--t takes comma-separated noise fractions in [0, 1], got {part!r}"), "--t") from None
    return values


def sdxl(
    model: str = typer.Option(None, help="tiny-sdxl | a folder saved with save_pretrained | a hub id "
                                          "(e.g. stabilityai/stable-diffusion-xl-base-1.0). Not needed with --plan."),
    out: Path = typer.Option(..., help="Output folder (results.json, figures, parts/); a rerun resumes."),
    style: list[str] = typer.Option(None, "--style", help="A style phrase added to the built-in ones (repeatable)."),
    content: list[str] = typer.Option(None, "--content", help="A content phrase added to the built-in ones (repeatable)."),
    builtin: bool = typer.Option(True, "--builtin/--no-builtin",
                                 help="Include the built-in styles (watercolor, oil, pencil) and contents (cat, dog, "
                                      "horse, red hat); --no-builtin uses only --style / --content."),
    t: str = typer.Option("0.2,0.5,0.8", "--t", help="Noise fractions in [0, 1], comma-separated (0 clean, 1 noise)."),
    seeds: int = typer.Option(2, help="Forward-process samples per noise level (seeds 0..N-1; >= 1)."),
    sites: str = typer.Option("blocks", help="'blocks' (every down / mid / up block output) or comma-separated module "
                                             "paths / globs, e.g. '*attn2'."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when present)."),
    dtype: str = typer.Option(None, help="float16 | bfloat16 | float32 (default: float16 on CUDA for a hub id, else "
                                         "the loaded dtype; --plan assumes float16)."),
    json_out: Path = typer.Option(None, "--json", help="Also write results.json's content (or the plan) here."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that is not this command's (nothing is deleted)."),
    threads: int = typer.Option(None, help="torch.set_num_threads (>= 1)."),
    plan: bool = typer.Option(False, "--plan", help="Only report the U-Net calls and byte cost of the full-size SDXL "
                                                    "run (meta device, no weights) to stdout and OUT/plan.json."),
) -> None:
    """Per-phrase ablation maps in latent space and at each U-Net layer, and concept cosines (style vs content).

    Example: ``scorescope features sdxl --model stabilityai/stable-diffusion-xl-base-1.0 --out runs/sdxl``.
    """
    import torch

    from interp.clevr.evaluate import OptionError
    from scorescope.experiments import sdxl_features as sf

    styles, contents = list(style or []), list(content or [])
    try:
        sf.prompt_set(styles, contents, builtin=builtin)
        levels = sf.check_levels(_levels(t))
        sf.check_seeds(seeds)
    except OptionError as err:
        raise _bad(err, err.option) from None
    if dtype is not None and dtype not in DTYPES:
        raise _bad(ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}"), "--dtype")
    torch_dtype = getattr(torch, dtype) if dtype else None
    if threads is not None and threads < 1:
        raise _bad(ValueError(f"--threads must be >= 1, got {threads}"), "--threads")
    if device is not None and device != "cpu" and not device.startswith("cuda"):
        raise _bad(ValueError(f"--device must be cpu or cuda, got {device!r}"), "--device")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise _bad(ValueError("no CUDA device is available; use --device cpu"), "--device")
    if json_out is not None:
        from interp.io import check_writable_file

        try:
            check_writable_file(json_out, what="--json file")
        except ValueError as err:
            raise _bad(err, "--json") from None
    if threads:
        torch.set_num_threads(threads)

    if plan:
        from interp.io import atomic_write_json, prepare_output_dir

        try:
            report = sf.plan_sdxl(styles=styles, contents=contents, builtin=builtin, t=levels, seeds=seeds, sites=sites,
                                  dtype=torch_dtype or torch.float16)
        except OptionError as err:
            raise _bad(err, err.option) from None
        try:
            folder = prepare_output_dir(out, sf.KIND, overwrite=overwrite)
        except FileExistsError as err:
            raise _bad(err, "--out") from None
        atomic_write_json(folder / "plan.json", report)
        if json_out is not None:
            atomic_write_json(json_out, report)
        typer.echo(f"plan (full-size SDXL, no weights loaded): {report['summary']}")
        typer.echo(f"{report['calls_formula']}; written to {folder / 'plan.json'}")
        return
    if model is None:
        raise _bad(ValueError("--model is required (tiny-sdxl, a pipeline folder or a hub id), unless --plan"), "--model")
    try:
        res = sf.run_sdxl_features(model, out=out, styles=styles, contents=contents, builtin=builtin, t=levels,
                                   seeds=seeds, sites=sites, device=device, dtype=torch_dtype, json_path=json_out,
                                   overwrite=overwrite, progress=typer.echo)
    except OptionError as err:
        raise _bad(err, err.option) from None
    except FileExistsError as err:
        raise _bad(err, "--out") from None
    typer.echo(f"{len(res.ran)} units run, {len(res.skipped)} resumed, {res.calls.get('total', 0)} U-Net calls, "
               f"{res.wall_s:.0f} s; " + ", ".join(str(p) for p in res.paths.values()))
