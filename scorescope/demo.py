"""``scorescope demo``: capture + locality maps end to end, on a shipped CLEVR checkpoint or the tiny models.

What it does, in order (every step seeded; outputs under ``out/``):

1. Loads the model: ``default`` is the shipped ``exp1`` CLEVR checkpoint (installed with the package; the
   bundled tiny random CLEVR pipeline only if the assets were removed).
2. Samples a two-object scene while streaming every cross-attention (``*attn2``) output of every step to
   safetensors shards (``activations/``), and tabulates what was captured (``capture.csv``).
3. Measures pixel locality (Jacobian maps of three output pixels, three noise levels) and conditional
   locality (∂D/∂c_j by forward-mode JVP, plus ablation maps) and writes tidy tables and figures.
4. Captures the tiny SDXL pipeline with classifier-free guidance, labelled per step and per branch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from interp.io import atomic_write, atomic_write_json, prepare_output_dir


def default_model() -> str:
    """``exp1`` when the shipped checkpoint is installed (it is, in every install of this repository), else ``tiny-clevr``."""
    from interp.models.shipped import available

    return "exp1" if "exp1" in available() else "tiny-clevr"


def _write_csv(df, path: Path) -> None:
    atomic_write(path, df.to_csv(index=False))


def _write_figure(fig, path: Path, dpi: int = 120) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip("."), dpi=dpi)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def run_demo(out: str | Path, *, model: str = "default", seed: int = 0, overwrite: bool = False) -> list[str]:
    """Run the demo and return a few summary lines (the files are the real output).

    ``out`` must be missing, empty, or an earlier demo's folder (its files are replaced); any other folder is
    refused unless ``overwrite``, and even then only the demo's own files are written — nothing is deleted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    import probes
    from interp.capture import capture, plan_capture
    from interp.store import ShardedStore
    from interp.models import prompt_conditioning, sdxl_denoiser, tiny_sdxl
    from interp.models.registry import load_model
    from interp.sampling import sample

    out = prepare_output_dir(out, "demo", overwrite=overwrite)
    torch.manual_seed(seed)
    lines: list[str] = []
    started = time.perf_counter()
    name = default_model() if model == "default" else model
    loaded = load_model(name, seed=seed)
    if loaded.family != "clevr":
        raise ValueError(f"the demo's locality part needs a CLEVR model, got {name!r} ({loaded.family})")
    den, pipe = loaded.denoiser, loaded.pipeline
    locations = [[0.28, 0.30], [0.72, 0.66]]
    cond = pipe.conditioning(locations)
    size = pipe.unet.config.sample_size

    # 1. capture while sampling, streamed to disk
    steps = 20
    plan = plan_capture(den, "*attn2", sample_shape=(1, 3, size, size), tokens_shape=(1, cond.tokens.shape[0], cond.dim), calls=steps)
    store_dir = out / "activations"
    # overwrite=True replaces only an earlier store's own shard files; anything else in the folder stays.
    store = ShardedStore(store_dir, metadata={**den.metadata(), "seed": seed, "locations": locations}, overwrite=True)
    try:
        with torch.no_grad(), capture(den, "*attn2", store=store, plan=plan) as cap:
            image = sample(den, cond, shape=(1, 3, size, size), num_steps=steps, seed=seed)
    finally:
        store.close()
    _write_csv(cap.frame(), out / "capture.csv")
    lines.append(f"model: {name}; captured {len(cap.store)} tensors ({plan}) into {store_dir}")

    # 2. pixel locality
    pixels = [(size // 2, size // 2), (round(0.30 * (size - 1)), round(0.28 * (size - 1))), (4, 4)]
    pix = probes.pixel_locality(den, cond, t=[0.1, 0.5, 0.9], seeds=[seed, seed + 1], pixels=pixels)
    _write_csv(pix.frame(), out / "pixel_locality.csv")
    G = pix["G"]  # (T, P, H, W)
    fig, axes = plt.subplots(1, G.shape[0], figsize=(3.2 * G.shape[0], 3))
    for i, ax in enumerate(axes):
        sns.heatmap(G[i, 0].numpy(), ax=ax, cmap="magma", square=True, cbar=False, xticklabels=False, yticklabels=False)
        ax.set_title(f"G(centre, ·), t = {pix.metadata['levels'][i]}")
    fig.tight_layout()
    _write_figure(fig, out / "pixel_locality.png")
    f = pix.frame()
    side = f[(f.metric == "side_50")].groupby("t").value.mean()
    lines.append("pixel locality: side of the square holding 50% of |dD/dx| mass, by noise level: "
                 + ", ".join(f"t={t:g}: {v:.1f}px" for t, v in side.items()))

    # 3. conditional locality (forward-mode JVP + ablation)
    con = probes.conditional_locality(den, cond, t=[0.5, 0.9], seeds=[seed], radius=0.2)
    _write_csv(con.frame(), out / "conditional_locality.csv")
    jvp = con["jvp"]  # (T, k, H, W)
    fig, axes = plt.subplots(1, jvp.shape[1], figsize=(3.2 * jvp.shape[1], 3))
    for j, ax in enumerate(axes):
        sns.heatmap(jvp[-1, j].numpy(), ax=ax, cmap="viridis", square=True, cbar=False, xticklabels=False, yticklabels=False)
        x, y = locations[j]
        ax.plot([x * size], [y * size], "w+", ms=12)
        ax.set_title(f"|dD/dc_{j}|, t = 0.9")
    fig.tight_layout()
    _write_figure(fig, out / "conditional_locality.png")
    cf = con.frame()
    inreg = cf[cf.metric == "in_region"].groupby("t").value.mean()
    lines.append("conditional locality: in-region fraction of dD/dc_j (radius 0.2): "
                 + ", ".join(f"t={t:g}: {v:.2f}" for t, v in inreg.items()))

    # 4. SDXL-architecture capture with CFG, labelled per step and branch
    sd = tiny_sdxl(seed)
    sd_cond = prompt_conditioning(sd, ["a red cube", "a blue sphere"])
    sd_den = sdxl_denoiser(sd, guidance_scale=5.0)
    with torch.no_grad(), capture(sd_den, ["mid_block", "*attn2"]) as sd_cap:
        sample(sd_den, sd_cond, shape=(1, 4, 32, 32), num_steps=3, seed=seed, scheduler="euler")
    sd_frame = sd_cap.frame()
    _write_csv(sd_frame, out / "sdxl_capture.csv")
    lines.append(f"tiny SDXL: {len(sd_frame)} tensors over steps {sorted(sd_frame.step.unique().tolist())}, "
                 f"branches {sorted(sd_frame.branch.unique().tolist())}")

    img = ((image[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    fig = plt.figure(figsize=(2, 2))
    fig.figimage(img, resize=True)
    _write_figure(fig, out / "sample.png", dpi=100)
    summary = {
        "model": name,
        "seed": seed,
        "locations": locations,
        "files": sorted(p.name for p in out.iterdir() if not p.name.startswith(".")),
        "wall_seconds": round(time.perf_counter() - started, 2),
        **den.metadata(),
    }
    atomic_write_json(out / "summary.json", summary)
    lines.append(f"wrote {len(summary['files'])} outputs to {out} in {summary['wall_seconds']} s")
    return lines
