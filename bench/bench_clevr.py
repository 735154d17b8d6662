"""Benchmarks of the CLEVR world: renderer throughput, detector accuracy, locality of the Exp3 U-Net, step times.

    .venv/bin/python bench/bench_clevr.py --out docs/bench/clevr.json [--quick]

Everything runs on one CPU thread (the renderer is numpy; torch is pinned to one thread too). Numbers on a
shared machine vary with its load: the JSON records the load average next to each timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from interp.io import atomic_write_json  # noqa: E402


def _load() -> float:
    return os.getloadavg()[0]


def bench_renderer(quick: bool) -> list[dict]:
    from interp.clevr.render import random_scene, render

    rows = []
    batch, reps = 256, (2 if quick else 6)
    for size in (32, 64):
        for lo, hi in ((1, 3), (0, 10)):
            rng = np.random.default_rng(0)
            t = time.perf_counter()
            scenes = [random_scene(rng, rng.integers(lo, hi + 1, batch)) for _ in range(reps)]
            t_place = time.perf_counter() - t
            render(scenes[0], size)  # warm up
            t = time.perf_counter()
            for sc in scenes:
                render(sc, size)
            t_render = time.perf_counter() - t
            n = batch * reps
            rows.append({
                "size": size, "objects": f"{lo}-{hi}", "scenes": n,
                "render_scenes_per_s": round(n / t_render), "placement_scenes_per_s": round(n / t_place),
                "end_to_end_scenes_per_s": round(n / (t_render + t_place)), "load_avg": round(_load(), 2),
            })
            print(rows[-1], flush=True)
    return rows


def bench_detector(quick: bool) -> list[dict]:
    from interp.clevr.detect import degrade, detect
    from interp.clevr.metrics import match
    from interp.clevr.render import render_random

    per_k = 20 if quick else 60
    counts = np.repeat(np.arange(11), per_k)
    r = render_random(4242, counts, 32)  # not the tuning seed (1000) nor the test seed (2024)
    sc = r.scene
    req = [sc.positions[b][sc.valid[b]] for b in range(len(counts))]
    rows = []
    for noise, blur, note in [(0, 0, "clean"), (0, 1.0, "blur 1 px"), (0.03, 0.6, "noise .03 + blur .6"),
                              (0.05, 0.6, "noise .05 + blur .6"), (0.03, 1.0, "noise .03 + blur 1"),
                              (0.08, 0.8, "stress: noise .08 + blur .8")]:
        imgs = r.images if noise == blur == 0 else degrade(r.images, seed=9, noise=noise, blur=blur)
        det = detect(imgs)
        matched = sum(len(match(q, d)) for q, d in zip(req, det.positions))
        acc_k = [float((det.counts[counts == k] == k).mean()) for k in range(11)]
        rows.append({"condition": note, "noise": noise, "blur_px": blur, "n": len(counts),
                     "count_acc": round(float((det.counts == counts).mean()), 4), "min_count_acc_over_k": round(min(acc_k), 4),
                     "recall": round(matched / counts.sum(), 4), "precision": round(matched / max(1, det.counts.sum()), 4)})
        print(rows[-1], flush=True)
    return rows


def bench_locality() -> dict:
    """The Exp3 U-Net (CPU recipe config, random init, float64): dependence outside the stated radii."""
    from interp.clevr.train import get_recipe
    from interp.models.clevr_local import ClevrLocalUNet, LocatedLocationEncoder, conditioner_radius, receptive_radius_px

    rec = get_recipe("exp3")
    torch.manual_seed(0)
    m = ClevrLocalUNet(sample_size=32, cross_attention_dim=rec.token_dim, **rec.unet).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = LocatedLocationEncoder(rec.token_dim).double()
    R = receptive_radius_px(m)
    rc = conditioner_radius(m)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64, requires_grad=True)
    tok0 = enc.null_token.detach()[None].double()
    out = m(x, 400, tok0).sample
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    worst_pix = 0.0
    for r, c in [(16, 16), (3, 29), (27, 5), (10, 20)]:
        (gr,) = torch.autograd.grad(out[0, :, r, c].sum(), x, retain_graph=True)
        gr = gr.abs().sum(1)[0]
        far = torch.maximum((rows - r).abs(), (cols - c).abs()) > R
        worst_pix = max(worst_pix, float(gr[far].max() / gr.max()))
    # conditioners: add one at many places; measure the change outside rc and the farthest nonzero change
    centres = (torch.arange(32, dtype=torch.float64) + 0.5) / 32
    worst_cond, reach = 0.0, 0.0
    xs = x.detach()
    for loc in [(0.5, 0.5), (0.2, 0.8), (0.73, 0.31), (0.11, 0.12), (0.9, 0.9)]:
        base_tok, base_mask = enc(torch.tensor([[[0.5, 0.5]]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.bool))
        tok, mask = enc(torch.tensor([[list(loc)]], dtype=torch.float64))
        with torch.no_grad():
            a = m(xs, 400, base_tok, encoder_attention_mask=base_mask).sample
            b = m(xs, 400, tok, encoder_attention_mask=mask).sample
        diff = (b - a).abs().sum(1)[0]
        dist = torch.sqrt((centres[None, :] - loc[0]) ** 2 + (centres[:, None] - loc[1]) ** 2)
        worst_cond = max(worst_cond, float(diff[dist > rc].max() / diff.max()))
        reach = max(reach, float(dist[diff > 1e-12 * diff.max()].max()))
    res = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(m.config).items() if not k.startswith("_")},
        "receptive_radius_px": R,
        "conditioner_radius": round(rc, 4),
        "conditioner_radius_px": round(rc * 32, 2),
        "max_rel_pixel_dependence_outside_radius": worst_pix,
        "max_rel_conditioner_dependence_outside_radius": worst_cond,
        "measured_conditioner_reach": round(reach, 4),
    }
    print(res, flush=True)
    return res


def bench_steps(quick: bool) -> list[dict]:
    from interp.clevr.train import _Trainable, build_pipeline, get_recipe
    from interp.clevr.datasets import ClevrStream

    rows = []
    for name in ("exp1", "exp3", "colour"):
        rec = get_recipe(name)
        pipe = build_pipeline(rec)
        model = _Trainable(pipe.unet, pipe.location_encoder)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        b = ClevrStream(rec.data, rec.batch_size, 32, 0).batch(0)
        ts = []
        for i in range(2 if quick else 5):
            t = time.perf_counter()
            noise = torch.randn_like(b["images"])
            loss = model(b["images"] + noise, torch.randint(0, 1000, (rec.batch_size,)), b["locations"], b["mask"], b["colours"], noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append({"recipe": name, "params": n_params, "batch": rec.batch_size, "s_per_step_median": round(float(np.median(ts[1:] or ts)), 3), "load_avg": round(_load(), 2)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="clevr_bench.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="renderer,detector,locality,steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = set(args.only.split(","))
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", "threads": 1}
    if "renderer" in only:
        res["renderer"] = bench_renderer(args.quick)
    if "detector" in only:
        res["detector"] = bench_detector(args.quick)
    if "locality" in only:
        res["locality"] = bench_locality()
    if "steps" in only:
        res["train_steps"] = bench_steps(args.quick)
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
