"""``scorescope demo``: capture + locality maps end to end, on a shipped CLEVR checkpoint or the tiny models.

What it does, in order (every step seeded; outputs under ``out/``):

1. Loads the model: ``default`` is the shipped ``exp1`` CLEVR checkpoint when it is installed, else the
   bundled tiny random CLEVR pipeline (so the demo runs anywhere, in seconds).
2. Samples a two-object scene while streaming every cross-attention (``*attn2``) output of every step to
   safetensors shards (``activations/``), and tabulates what was captured (``capture.csv``).
3. Measures pixel locality (Jacobian maps of three output pixels, three noise levels) and conditional
   locality (∂D/∂c_j by forward-mode JVP, plus ablation maps) and writes tidy tables and figures.
4. Captures the tiny SDXL pipeline with classifier-free guidance, labelled per step and per branch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _default_model() -> str:
    try:
        from interp.clevr.checkpoints import available

        return "exp1" if "exp1" in available() else "tiny-clevr"
    except Exception:  # checkpoints not shipped in this install
        return "tiny-clevr"


def run_demo(out: str | Path, *, model: str = "default", seed: int = 0) -> list[str]:
    """Run the demo and return a few summary lines (the files are the real output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    import probes
    from interp.capture import capture, plan_capture
    from interp.models import prompt_conditioning, sdxl_denoiser, tiny_sdxl
    from interp.models.registry import load_model
    from interp.sampling import sample

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    lines: list[str] = []
    started = time.perf_counter()
    name = _default_model() if model == "default" else model
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
    if store_dir.exists():
        import shutil

        shutil.rmtree(store_dir)
    with torch.no_grad(), capture(den, "*attn2", store=store_dir, plan=plan, metadata={"seed": seed, "locations": locations}) as cap:
        image = sample(den, cond, shape=(1, 3, size, size), num_steps=steps, seed=seed)
    cap.frame().to_csv(out / "capture.csv", index=False)
    lines.append(f"model: {name}; captured {len(cap.store)} tensors ({plan}) into {store_dir}")

    # 2. pixel locality
    pixels = [(size // 2, size // 2), (round(0.30 * (size - 1)), round(0.28 * (size - 1))), (4, 4)]
    pix = probes.pixel_locality(den, cond, t=[0.1, 0.5, 0.9], seeds=[seed, seed + 1], pixels=pixels)
    pix.frame().to_csv(out / "pixel_locality.csv", index=False)
    G = pix["G"]  # (T, P, H, W)
    fig, axes = plt.subplots(1, G.shape[0], figsize=(3.2 * G.shape[0], 3))
    for i, ax in enumerate(axes):
        sns.heatmap(G[i, 0].numpy(), ax=ax, cmap="magma", square=True, cbar=False, xticklabels=False, yticklabels=False)
        ax.set_title(f"G(centre, ·), t = {pix.metadata['levels'][i]}")
    fig.tight_layout()
    fig.savefig(out / "pixel_locality.png", dpi=120)
    plt.close(fig)
    f = pix.frame()
    side = f[(f.metric == "side_50")].groupby("t").value.mean()
    lines.append("pixel locality: side of the square holding 50% of |dD/dx| mass, by noise level: "
                 + ", ".join(f"t={t:g}: {v:.1f}px" for t, v in side.items()))

    # 3. conditional locality (forward-mode JVP + ablation)
    con = probes.conditional_locality(den, cond, t=[0.5, 0.9], seeds=[seed], radius=0.2)
    con.frame().to_csv(out / "conditional_locality.csv", index=False)
    jvp = con["jvp"]  # (T, k, H, W)
    fig, axes = plt.subplots(1, jvp.shape[1], figsize=(3.2 * jvp.shape[1], 3))
    for j, ax in enumerate(axes):
        sns.heatmap(jvp[-1, j].numpy(), ax=ax, cmap="viridis", square=True, cbar=False, xticklabels=False, yticklabels=False)
        x, y = locations[j]
        ax.plot([x * size], [y * size], "w+", ms=12)
        ax.set_title(f"|dD/dc_{j}|, t = 0.9")
    fig.tight_layout()
    fig.savefig(out / "conditional_locality.png", dpi=120)
    plt.close(fig)
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
    sd_frame.to_csv(out / "sdxl_capture.csv", index=False)
    lines.append(f"tiny SDXL: {len(sd_frame)} tensors over steps {sorted(sd_frame.step.unique().tolist())}, "
                 f"branches {sorted(sd_frame.branch.unique().tolist())}")

    img = ((image[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    plt.imsave(out / "sample.png", img)
    summary = {
        "model": name,
        "seed": seed,
        "locations": locations,
        "files": sorted(p.name for p in out.iterdir()),
        "wall_seconds": round(time.perf_counter() - started, 2),
        **den.metadata(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    lines.append(f"wrote {len(summary['files'])} outputs to {out} in {summary['wall_seconds']} s")
    return lines
