"""Benchmarks of the locality probes: ratios measured side by side in one run (CPU).

Run on demand (not a test)::

    python bench/bench_probes.py --out docs/bench/probes.json [--threads 1] [--preset tiny]
    python bench/bench_probes.py --checkpoints exp1,exp2,exp3 --out docs/bench/clevr_locality.json

(a) **Pixel Jacobian, all rows** of the CLEVR U-Net (``--preset``, random weights, 32×32×3 → 3,072 rows):
    * ``batched``: :func:`probes.pixel_jacobian` — one linearisation, chunks of cotangents through
      ``vmap(vjp)`` (diffusers' fused SDPA processor left in place), chunk from the memory budget;
    * ``batched_plain_attn``: the same with the plain ``AttnProcessor`` swapped in (``derivative_ready=True``);
    * ``loop``: one forward, then ``torch.autograd.grad(out[row], x, retain_graph=True)`` per row;
    * ``floor``: rows × the time of *one* VJP (a single ``autograd.grad`` with a one-hot cotangent,
      median of ``--repeats``), measured in the same run: what a perfect batched implementation could
      not beat on one core without amortising the backward.
    The loop and floor run on ``--loop-rows`` rows and are scaled to all rows (stated in the output).
(b) **Compressed vs dense** on the exactly local toy model, on the global one, and on the Exp3
    locality-enforcing CLEVR U-Net (random init, its measured receptive radius) at 32×32×3: backward passes
    and wall time of :func:`probes.compressed_jacobian` (certificate + dense fallback) vs
    :func:`probes.pixel_jacobian` (all rows), and the max difference between them.
(c) **Conditional maps: JVP vs captum IntegratedGradients (50 steps)** on the tiny CLEVR model with two
    conditioners and on the linear toy model: the signed attribution map ``(∂D/∂c_j)·(c_j − b_j)`` for every
    pixel by forward mode (one pass per conditioner), vs IG over the tokens for ``--ig-pixels`` output
    pixels (all channels; each output element is a separate IG target), scaled to the full map.
    Baseline ``b``: zeros for CLEVR; for the toy, its tokens with the features zeroed and the locations kept.
    Agreement between the two on the probed pixels: cosine similarity and sign agreement (on entries
    above 1 % of the max). For reference, the exact Frobenius JVP map (``directions="all"``) is timed too.

(d) **Speed** (``--only speed``, issue 14) on ``--speed-model`` (default the shipped exp1): 16-pixel (48-row)
    and all-row Jacobians, conditional maps (attribution, JVP with 8 random directions, ablation; k = 2),
    each timed interleaved against the hand-written references of ``bench/reference_impls.py`` and the
    code of ``--before`` (a git revision, default ``121bbb1``: the last commit before issue 14's changes;
    ``git show REV:...``, the "before"), medians of ``--repeats``; plus the growth of one
    dense row's cost from 32² to 64². ``--only compressed_shipped``: compressed vs dense on shipped exp3/exp1.

Intra-op threads: ``--threads`` (default 1). On a 2-core machine shared with other processes, two threads
made a tiny U-Net forward ~100× slower through OpenMP barrier contention; one thread is the honest setting.
The JSON holds the machine, the settings and all numbers; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/reference_impls.py

from interp.models import clevr_pipeline  # noqa: E402
from probes import compressed_jacobian, conditional_locality, integrated_gradients_map, pixel_jacobian  # noqa: E402
from interp.inputs import forward_samples  # noqa: E402
from interp.io import atomic_write_json  # noqa: E402
from interp.evaluate import evaluate  # noqa: E402
from interp.models.analytic import feature_baseline, toy_conditioning, toy_denoiser  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_jacobian(preset: str, loop_rows: int, repeats: int) -> dict:
    pipe = clevr_pipeline(preset, seed=0)
    den = pipe.denoiser()
    cond = pipe.conditioning([[0.25, 0.3], [0.7, 0.75]])
    x, ts = forward_samples(den, 0.5, [0])
    C, H, W = x.shape[1:]
    rows = C * H * W
    jac, t_batched = timed(lambda: pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels="all"))
    _, t_plain = timed(lambda: pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels="all", derivative_ready=True))
    # per-row loop on a subset, scaled
    xx = x.clone().requires_grad_(True)
    out = evaluate(den, xx, ts, cond)
    flat = out.flatten()
    idx = torch.linspace(0, rows - 1, loop_rows).long()
    t0 = time.perf_counter()
    loop_rows_out = [torch.autograd.grad(flat[i], xx, retain_graph=True)[0] for i in idx]
    t_loop = (time.perf_counter() - t0) * rows / loop_rows
    # flat output index i = c * H * W + pixel; the probe's rows are (pixel, c_out)
    err = max(float((jac[0, int(i) % (H * W), int(i) // (H * W)] - g[0]).abs().max()) for i, g in zip(idx, loop_rows_out))
    singles = []
    for r in range(repeats):
        cot = torch.zeros_like(out)
        cot.view(-1)[int(idx[r % loop_rows])] = 1
        t0 = time.perf_counter()
        torch.autograd.grad(out, xx, cot, retain_graph=True)
        singles.append(time.perf_counter() - t0)
    t_floor = statistics.median(singles) * rows
    return {
        "model": f"clevr-{preset}", "params": sum(p.numel() for p in den.unet.parameters()), "rows": rows,
        "batched_s": t_batched, "batched_plain_attn_s": t_plain, "loop_s_scaled": t_loop, "floor_s": t_floor,
        "loop_rows_measured": loop_rows, "max_abs_diff_batched_vs_loop": err,
        "loop_over_batched": t_loop / t_batched, "batched_over_floor": t_batched / t_floor,
        "plain_attn_over_sdpa": t_plain / t_batched,
    }


def _exp3_architecture(size: int):
    """The locality-enforcing CLEVR U-Net of Exp3 (random init) and its measured receptive radius."""
    from interp import Denoiser
    from interp.models.clevr_local import ClevrLocalUNet, LocatedLocationEncoder, receptive_radius_px

    torch.manual_seed(0)
    unet = ClevrLocalUNet(sample_size=size)
    enc = LocatedLocationEncoder(dim=unet.config.cross_attention_dim)
    with torch.no_grad():
        cond = enc.conditioning([[0.25, 0.25], [0.75, 0.7]])
    return Denoiser(unet, name="clevr-local"), cond, receptive_radius_px(unet)


def bench_compressed(size: int) -> list[dict]:
    out = []
    cases = [(f"toy-{kind}", toy_denoiser(kind, size=size, hidden=16), toy_conditioning([[0.25, 0.25], [0.75, 0.7]]), 2)
             for kind in ("local", "global")]
    den3, cond3, r3 = _exp3_architecture(size)
    cases.append(("clevr-local (Exp3 arch.)", den3, cond3, r3))
    for name, den, cond, radius in cases:
        x, ts = forward_samples(den, 0.5, [0])
        dense, t_dense = timed(lambda: pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels="all"))
        comp, t_comp = timed(lambda: compressed_jacobian(den, cond, x_t=x, timestep=ts, radius_px=radius))
        out.append({
            "model": name, "radius": radius, "image": f"3x{size}x{size}", "dense_passes": comp.dense_passes, "compressed_passes": comp.passes,
            "check_passes": comp.check_passes,
            "certified_fraction": float(comp.certified.float().mean()), "dense_s": t_dense, "compressed_s": t_comp,
            "pass_ratio": comp.dense_passes / comp.passes, "time_ratio": t_dense / t_comp,
            "max_abs_diff": float((comp.jacobian - dense).abs().max()),
        })
    return out


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.flatten().double(), b.flatten().double()
    cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
    big = (a.abs() > 0.01 * a.abs().max()) | (b.abs() > 0.01 * b.abs().max())
    sign = float((torch.sign(a[big]) == torch.sign(b[big])).double().mean()) if big.any() else 1.0
    return {"cosine": cos, "sign_agreement": sign}


def bench_conditional(ig_pixels: int) -> list[dict]:
    out = []
    pipe = clevr_pipeline("tiny", seed=0)
    toy_cond = toy_conditioning([[0.25, 0.25], [0.75, 0.7]])
    cases = [("clevr-tiny", pipe.denoiser(), pipe.conditioning([[0.25, 0.3], [0.7, 0.75]]), None),
             # the toy's tokens carry their location: the baseline keeps it and zeroes the features
             ("toy-linear", toy_denoiser("linear", size=32), toy_cond, feature_baseline(toy_cond))]
    for name, den, cond, base in cases:
        H = W = 32
        dt = torch.float32
        jv, t_jvp = timed(lambda: conditional_locality(den, cond, 0.5, [0], maps=("attribution",), baseline=base, dtype=dt))
        _, t_fro = timed(lambda: conditional_locality(den, cond, 0.5, [0], maps=("jvp",), directions="all", dtype=dt))
        step = max(1, int((H * W / ig_pixels) ** 0.5))
        px = [(r, c) for r in range(step // 2, H, step) for c in range(step // 2, W, step)][:ig_pixels]
        ig, t_ig = timed(lambda: integrated_gradients_map(den, cond, 0.5, [0], pixels=px, n_steps=50, baseline=base, dtype=dt,
                                                             internal_batch_size=200))
        mask = ig["probed"]
        a = jv["attribution"][0][..., mask]
        b = ig["attribution"][0][..., mask]
        t_ig_full = t_ig * (H * W) / len(px)
        out.append({
            "model": name, "k": cond.k, "jvp_attribution_full_map_s": t_jvp, "jvp_frobenius_full_map_s": t_fro,
            "ig50_pixels": len(px), "ig50_s": t_ig, "ig50_full_map_s_scaled": t_ig_full,
            "ig_over_jvp": t_ig_full / t_jvp, "ig_delta": float(ig["delta"].max()), **_agreement(a, b),
        })
    return out


def _rendered_scenes(locs: list[list[float]], seeds: int, size: int) -> torch.Tensor | None:
    """Clean CLEVR scenes with objects at ``locs`` (random shapes/colours per seed), in [-1, 1]; the
    forward process starts from them, so x_t looks like the training data at every noise level."""
    import numpy as np

    from interp.clevr.render import random_scene, render

    rng = np.random.default_rng(0)
    scene = random_scene(rng, [len(locs)] * seeds, positions=[np.asarray(locs, np.float32)] * seeds)
    return torch.from_numpy(render(scene, size=size).to_model_range()).float()


def compare_checkpoints(names: list[str], levels: list[float], seeds: int, directions: int) -> list[dict]:
    """Exp1/2/3 side by side (SCIENCE.md §2): in-region fraction of the JVP and ablation maps and the CPC
    residual, three well-separated objects, forward-process samples of rendered scenes with the objects
    at the conditioned locations (ours)."""
    from probes import cpc_residual

    from probes.summaries import region_fractions

    locs = [[0.25, 0.3], [0.72, 0.25], [0.5, 0.75]]
    # reference: the in-region fraction of a spatially uniform map (no locality at all)
    uniform = float(region_fractions(torch.ones(3, 32, 32), torch.tensor(locs), 0.2)["in_region"].mean())
    rows: list[dict] = [{"model": "uniform map (reference)", "t": float("nan"), "in_region_jvp": uniform,
                         "in_region_ablation": uniform, "n_eff_jvp": 3.0, "cpc_residual": float("nan")}]
    for name in names:
        from interp.models.registry import load_model

        # A shipped name, a save_pretrained folder, or a training-run folder; a missing one is an error to see.
        pipe = load_model(name).pipeline
        den = pipe.denoiser(name=name)
        cond = pipe.conditioning(locs)
        x0 = _rendered_scenes(locs, seeds, den.config.get("sample_size", 32))
        cl = conditional_locality(den, cond, levels, seeds, maps=("jvp", "ablation"), directions=directions, x0=x0).frame()
        cp = cpc_residual(den, cond, levels, seeds, x0=x0).frame()
        for t in levels:
            inr = cl[(cl.metric == "in_region") & (cl.t == t)].groupby("map_name").value.mean()
            rows.append({
                "model": name, "t": t, "in_region_jvp": float(inr.get("jvp", float("nan"))),
                "in_region_ablation": float(inr.get("ablation", float("nan"))),
                "n_eff_jvp": float(cl[(cl.metric == "n_eff") & (cl.t == t) & (cl.map_name == "jvp")].value.mean()),
                "cpc_residual": float(cp[(cp.metric == "cpc_residual") & (cp.t == t) & (cp["stat"] == "mean")].value.mean()),
            })
        print(json.dumps([r for r in rows if r["model"] == name], indent=1), flush=True)
    return rows


# --------------------------------------------------------------------------- speed (issue 14)


BEFORE = "121bbb1"  # the last commit before issue 14's speed work (--before)


def _head_module(path: str, name: str, rev: str | None = None):
    """One of our modules as of git revision ``rev`` (default :data:`BEFORE`), imported under ``name``: the "before" side of a
    before/after ratio measured in the same process, interleaved with the current code."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{rev or BEFORE}:{path}"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    folder = Path(tempfile.mkdtemp(prefix="bench-head-"))
    (folder / f"{name}.py").write_text(src)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _interleaved(variants: dict, repeats: int) -> dict:
    """Median / min seconds per variant, round-robin after one warm-up round (load hits every variant alike)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn)[1])
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs": len(v)} for k, v in times.items()}


def _ratios(t: dict, ref: str) -> dict:
    return {k: v["median_s"] / t[ref]["median_s"] for k, v in t.items()}


def bench_speed(model: str, repeats: int, loop_rows: int) -> dict:
    """Every figure of issue 14, each as ratios against a hand-written reference (bench/reference_impls.py),
    the code of revision ``BEFORE`` ("before", imported from git) and the current code ("after") side by side."""
    import reference_impls as ref

    from interp.inputs import pixel_list
    from interp.models.registry import load_model

    old_jac = _head_module("probes/jacobian.py", "head_jacobian")
    old_cond = _head_module("probes/conditional.py", "head_conditional")
    pipe = load_model(model).pipeline
    den = pipe.denoiser(name=model)
    cond = pipe.conditioning([[0.25, 0.3], [0.7, 0.75]])
    x, ts = forward_samples(den, 0.5, [0])
    C, H, W = x.shape[1:]
    out: dict = {"model": model}

    # (1) 16 pixels = 48 rows
    px = pixel_list([(4 + 8 * (i // 4), 4 + 8 * (i % 4)) for i in range(16)], (H, W))
    cot = ref.one_hot_rows(px, (C, H, W))
    a = pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels=px)
    b = ref.rows_vjp_vmap(den, x, ts, cond, cot)
    t = _interleaved({
        "reference vjp+vmap (frozen)": lambda: ref.rows_vjp_vmap(den, x, ts, cond, cot),
        "before": lambda: old_jac.pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels=px),
        "after": lambda: pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels=px),
    }, repeats)
    out["few_pixels"] = {"rows": int(cot.shape[0]), "times": t, "ratio_to_reference": _ratios(t, "reference vjp+vmap (frozen)"),
                         "max_abs_diff": float((a[0].reshape(b.shape) - b).abs().max())}
    print(json.dumps(out["few_pixels"], indent=1), flush=True)

    # (2) all rows
    rows = C * H * W
    t = _interleaved({
        "reference jacrev(chunk_size=32) (frozen)": lambda: ref.rows_jacrev(den, x, ts, cond),
        "before": lambda: old_jac.pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels="all"),
        "after": lambda: pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels="all"),
    }, max(1, repeats // 3))
    floor = ref.one_vjp_seconds(den, x, ts, cond, 15) * rows
    idx = torch.linspace(0, rows - 1, loop_rows).long()
    _, t_loop = timed(lambda: ref.rows_loop(den, x, ts, cond, idx))
    t["floor: rows x one VJP"] = {"median_s": floor}
    t["per-row loop (scaled)"] = {"median_s": t_loop * rows / loop_rows, "rows_measured": loop_rows}
    out["all_rows"] = {"rows": rows, "times": t, "ratio_to_jacrev": _ratios(t, "reference jacrev(chunk_size=32) (frozen)"),
                       "after_over_floor": t["after"]["median_s"] / floor}
    print(json.dumps(out["all_rows"], indent=1), flush=True)

    # (3) conditional maps, k = 2, one sample
    from probes.conditional import direction_set

    moves = torch.zeros(cond.k, *cond.tokens.shape)
    for j in range(cond.k):
        idx_j = cond.token_indices(j)
        moves[j, idx_j] = cond.tokens[idx_j]
    dirs = torch.cat([direction_set(cond, j, 8, seed=j)[0] for j in range(cond.k)])
    maps_out = {}
    for kind, refs, kw in (
        ("attribution", {"reference forward (jvp)": lambda: ref.jvp_forward(den, x, ts, cond, moves),
                         "reference reverse (double backward)": lambda: ref.jvp_reverse(den, x, ts, cond, moves)},
         dict(maps=("attribution",))),
        ("jvp", {"reference forward (jvp)": lambda: ref.jvp_forward(den, x, ts, cond, dirs),
                 "reference reverse (double backward)": lambda: ref.jvp_reverse(den, x, ts, cond, dirs)},
         dict(maps=("jvp",), directions=8)),
        ("ablation", {"reference k+1 forwards": lambda: ref.ablation_forwards(den, x, ts, cond)}, dict(maps=("ablation",))),
    ):
        variants = dict(refs)
        variants["before"] = lambda kw=kw: old_cond.conditional_locality(den, cond, x_t=x, timestep=ts, **kw)
        variants["after (auto)"] = lambda kw=kw: conditional_locality(den, cond, x_t=x, timestep=ts, **kw)
        if kind != "ablation":
            variants["after, mode=forward"] = lambda kw=kw: conditional_locality(den, cond, x_t=x, timestep=ts, mode="forward", **kw)
        t = _interleaved(variants, repeats)
        best = min((k for k in refs), key=lambda k: t[k]["median_s"])
        entry = {"times": t, "fastest_reference": best, "ratio_to_fastest_reference": _ratios(t, best)}
        if kind != "ablation":
            f = conditional_locality(den, cond, x_t=x, timestep=ts, mode="forward", **kw)[kind]
            r = conditional_locality(den, cond, x_t=x, timestep=ts, mode="reverse", **kw)[kind]
            entry["mode_auto"] = conditional_locality(den, cond, x_t=x, timestep=ts, **kw).metadata["mode"]
            entry["forward_vs_reverse_max_abs_diff"] = float((f - r).abs().max())
            entry["map_max_abs"] = float(f.abs().max())
        maps_out[kind] = entry
        print(kind, json.dumps(entry, indent=1), flush=True)
    out["conditional"] = maps_out

    # (4) cost growth of one dense row, 32² vs 64² (tiny CLEVR preset, random init)
    growth = {}
    for size in (32, 64):
        p2 = clevr_pipeline("tiny", seed=0, sample_size=size)
        d2 = p2.denoiser()
        c2 = p2.conditioning([[0.25, 0.3], [0.7, 0.75]])
        x2, t2 = forward_samples(d2, 0.5, [0])
        growth[size] = ref.one_vjp_seconds(d2, x2, t2, c2, 15)
    out["row_cost_growth"] = {"one_vjp_s": growth, "ratio_64_over_32": growth[64] / growth[32]}
    print(json.dumps(out["row_cost_growth"], indent=1), flush=True)
    return out


def bench_compressed_shipped(names: list[str]) -> list[dict]:
    """Compressed vs dense on shipped checkpoints (exp3: its measured receptive radius; others: radius 4)."""
    from interp.models.clevr_local import ClevrLocalUNet, receptive_radius_px
    from interp.models.registry import load_model

    rows = []
    for name in names:
        pipe = load_model(name).pipeline
        den = pipe.denoiser(name=name)
        cond = pipe.conditioning([[0.25, 0.3], [0.7, 0.75]])
        radius = receptive_radius_px(den.unet) if isinstance(den.unet, ClevrLocalUNet) else 4
        x, ts = forward_samples(den, 0.5, [0])
        dense, t_dense = timed(lambda: pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels="all"))
        comp, t_comp = timed(lambda: compressed_jacobian(den, cond, x_t=x, timestep=ts, radius_px=radius))
        rows.append({"model": name, "radius": radius, "dense_passes": comp.dense_passes, "compressed_passes": comp.passes,
                     "check_passes": comp.check_passes, "certified_fraction": float(comp.certified.float().mean()),
                     "dense_s": t_dense, "compressed_s": t_comp, "pass_ratio": comp.dense_passes / comp.passes,
                     "time_ratio": t_dense / t_comp, "max_abs_diff": float((comp.jacobian - dense).abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--loop-rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ig-pixels", type=int, default=16)
    ap.add_argument("--checkpoints", default=None, help="e.g. exp1,exp2,exp3: only compare shipped CLEVR checkpoints")
    ap.add_argument("--only", default="jacobian,compressed,conditional", help="sections to run")
    ap.add_argument("--levels", default="0.9,0.5,0.1")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--speed-model", default="exp1", help="model of the speed section (a shipped name)")
    ap.add_argument("--before", default=BEFORE, help="git revision whose probes are the 'before' of the speed section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoints:
        rows = compare_checkpoints(args.checkpoints.split(","), [float(v) for v in args.levels.split(",")], args.seeds, 8)
        print("\n| model | t | in-region (JVP) | in-region (ablation) | n_eff | CPC residual |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['t']} | {r['in_region_jvp']:.3f} | {r['in_region_ablation']:.3f} | {r['n_eff_jvp']:.2f} | {r['cpc_residual']:.3f} |")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.out, {"checkpoints": rows, "settings": vars(args) | {"out": str(args.out)}})
        return
    torch.manual_seed(0)
    res = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "loadavg": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": vars(args) | {"out": str(args.out)},
    }
    sections = set(args.only.split(","))
    if "jacobian" in sections:
        res["jacobian"] = bench_jacobian(args.preset, args.loop_rows, args.repeats)
        print(json.dumps(res["jacobian"], indent=1), flush=True)
    if "compressed" in sections:
        res["compressed"] = bench_compressed(args.size)
        print(json.dumps(res["compressed"], indent=1), flush=True)
    if "speed" in sections:
        globals()["BEFORE"] = args.before  # read by _head_module
        res["speed"] = bench_speed(args.speed_model, args.repeats, args.loop_rows)
    if "compressed_shipped" in sections:
        res["compressed_shipped"] = bench_compressed_shipped(["exp3", "exp1"])
    if "conditional" in sections:
        res["conditional"] = bench_conditional(args.ig_pixels)
        print(json.dumps(res["conditional"], indent=1), flush=True)
    res["machine"]["loadavg_end"] = os.getloadavg()
    print("\n| measurement | value |\n|---|---|")
    if "jacobian" in res:
        j = res["jacobian"]
        print(f"| pixel Jacobian {j['model']} all {j['rows']} rows: batched | {j['batched_s']:.2f} s |")
        print(f"| per-row autograd.grad loop (scaled from {j['loop_rows_measured']} rows) | {j['loop_s_scaled']:.2f} s ({j['loop_over_batched']:.2f}x batched) |")
        print(f"| floor: rows x one VJP | {j['floor_s']:.2f} s (batched/floor {j['batched_over_floor']:.2f}) |")
        print(f"| batched with the plain AttnProcessor swapped in | {j['batched_plain_attn_s']:.2f} s ({j['plain_attn_over_sdpa']:.2f}x) |")
    for c in res.get("compressed", []):
        print(f"| compressed vs dense, {c['model']} {c['image']} | passes {c['compressed_passes']} (of which {c['check_passes']} "
              f"certificate checks) vs {c['dense_passes']} "
              f"({c['pass_ratio']:.2f}x), time {c['compressed_s']:.2f} vs {c['dense_s']:.2f} s ({c['time_ratio']:.2f}x), "
              f"certified {c['certified_fraction']:.2f}, max diff {c['max_abs_diff']:.1e} |")
    for c in res.get("conditional", []):
        print(f"| conditional map {c['model']}: JVP {c['jvp_attribution_full_map_s']:.2f} s vs IG-50 {c['ig50_full_map_s_scaled']:.1f} s "
              f"(scaled from {c['ig50_pixels']} px; {c['ig_over_jvp']:.0f}x) | cosine {c['cosine']:.3f}, sign {c['sign_agreement']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
