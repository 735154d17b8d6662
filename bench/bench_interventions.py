"""Benchmarks of the intervene verb (``make bench`` → docs/BENCHMARKS.md).

Three ratios, each measured side by side in one process (interleaved repeats, medians), CPU, one thread:

1. **Overhead of ``apply``**: sampling under a no-op edit (a ``Patch`` of a step the run never makes) and under
   edits that do work (``MaskCrossAttention`` with a radius that hides nothing / hides something) vs plain sampling.
2. **Cost of composition vs k**: one U-Net call under ``ComposeScores`` and under ``Compose`` at every ``attn2``
   vs the plain call, for k = 1…8 conditioners (the k + 1 extra rows run batched in one forward, so the cost should
   grow about linearly in k + 2 rows).
3. **Evaluation throughput**: samples/s of the CLEVR length-generalisation evaluation (``evaluate_length``) under
   each edit vs plain, on a shipped checkpoint.
4. **Locality measured with each edit active** (``--only probes``): the probes confirm what an edit did — the
   in-region fraction of the conditional JVP and ablation maps and the CPC residual of the shipped model, without
   and with each locality intervention (three well-separated objects, forward-process samples of rendered scenes).

Absolute times are only meaningful from a GPU; on CPU read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import interventions as iv  # noqa: E402
from interp import sample  # noqa: E402
from interp.io import atomic_write_json  # noqa: E402
from interp.models.registry import load_model  # noqa: E402

LOCATIONS = [[0.2, 0.25], [0.75, 0.3], [0.5, 0.7], [0.25, 0.8], [0.8, 0.8], [0.5, 0.2], [0.15, 0.5], [0.85, 0.55]]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, calls interleaved so that load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_overhead(model: str, steps: int, batch: int, repeats: int) -> dict:
    den = load_model(model).denoiser
    cond = load_model(model).pipeline.conditioning(LOCATIONS[:2])
    size = den.config["sample_size"]

    def run(*edits: iv.Edit) -> Callable[[], object]:
        def go() -> object:
            with torch.no_grad():
                if not edits:
                    return sample(den, cond, shape=(batch, 3, size, size), num_steps=steps, seed=0)
                with iv.apply(den, *edits):
                    return sample(den, cond, shape=(batch, 3, size, size), num_steps=steps, seed=0)

        return go

    fns = {
        "plain": run(),
        "no-op Patch (unselected step)": run(iv.Patch("mid_block", iv.Zero(), steps=[10_000])),
        "MaskCrossAttention r=1.5 (hides nothing)": run(iv.MaskCrossAttention("*attn2", radius=1.5)),
        "MaskCrossAttention r=0.15": run(iv.MaskCrossAttention("*attn2", radius=0.15)),
    }
    med = interleaved(fns, repeats)
    return {"model": model, "steps": steps, "batch": batch, "median_s": med,
            "ratio_to_plain": {k: v / med["plain"] for k, v in med.items()}}


def bench_compose(model: str, repeats: int, ks: list[int]) -> list[dict]:
    loaded = load_model(model)
    den, pipe = loaded.denoiser, loaded.pipeline
    size = den.config["sample_size"]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows = []
    for k in ks:
        cond = pipe.conditioning(LOCATIONS[:k])

        def call(*edits: iv.Edit) -> Callable[[], object]:
            def go() -> object:
                with torch.no_grad():
                    if not edits:
                        return den.predict(x, 500, cond)
                    with iv.apply(den, *edits):
                        return den.predict(x, 500, cond)

            return go

        med = interleaved({"plain": call(), "ComposeScores": call(iv.ComposeScores(0.15)),
                           "Compose every attn2": call(iv.Compose("*attn2", 0.15))}, repeats)
        rows.append({"k": k, "rows_per_call": k + 2, "median_s": med,
                     "ratio_to_plain": {n: v / med["plain"] for n, v in med.items()}})
    return rows


def bench_eval(model: str, n: int, k: int, steps: int) -> dict:
    from interp.clevr.evaluate import evaluate_length

    pipe = load_model(model).pipeline
    edits = {"plain": [], "MaskCrossAttention up attn2 r=0.15": [iv.MaskCrossAttention("up_blocks.*attn2", radius=0.15)],
             "Compose every attn2": [iv.Compose("*attn2", 0.15)], "ComposeScores": [iv.ComposeScores(0.15)]}
    out = {}
    for name, es in edits.items():
        t0 = time.perf_counter()
        if es:
            with iv.apply(pipe.unet, *es):
                res = evaluate_length(pipe, [k], n=n, seed=0, steps=steps, model_name=model)
        else:
            res = evaluate_length(pipe, [k], n=n, seed=0, steps=steps, model_name=model)
        wall = time.perf_counter() - t0
        row = res["per_k"][0]
        out[name] = {"wall_s": wall, "samples_per_s": n / wall, "recall": row["recall"], "count_acc": row["count_acc"]}
    plain = out["plain"]["samples_per_s"]
    for v in out.values():
        v["throughput_ratio"] = v["samples_per_s"] / plain
    return {"model": model, "n": n, "k": k, "steps": steps, "results": out}


def bench_probes_under_edits(model: str, levels: list[float], seeds: int, radius: float = 0.15) -> list[dict]:
    """In-region fraction (JVP and ablation maps) and CPC residual with each edit active (probes run inside ``apply``)."""
    import numpy as np

    import probes
    from interp.clevr.render import random_scene, render

    loaded = load_model(model)
    den, pipe = loaded.denoiser, loaded.pipeline
    locs = [[0.25, 0.3], [0.72, 0.25], [0.5, 0.75]]
    cond = pipe.conditioning(locs)
    rng = np.random.default_rng(0)
    scene = random_scene(rng, [len(locs)] * seeds, positions=[np.asarray(locs, np.float32)] * seeds)
    x0 = torch.from_numpy(render(scene, size=den.config["sample_size"]).to_model_range()).float()
    edits = {
        "none": [],
        "mask:up attn2": [iv.MaskCrossAttention("up_blocks.*attn2", radius=radius)],
        "compose:all attn2": [iv.Compose("*attn2", radius)],
        "compose-blocks-from:mid_block": [iv.Compose(("mid_block", *[f"up_blocks.{i}" for i in range(len(pipe.unet.up_blocks))]), radius)],
        "scores": [iv.ComposeScores(radius)],
    }
    rows = []
    for name, es in edits.items():
        with contextlib.ExitStack() as stack:
            if es:
                stack.enter_context(iv.apply(den, *es))
            cl = probes.conditional_locality(den, cond, t=levels, seeds=seeds, x0=x0, directions=4, radius=0.2).frame()
            cp = probes.cpc_residual(den, cond, t=levels, seeds=seeds, x0=x0, radius=radius).frame()
        for t in levels:
            inr = cl[(cl.metric == "in_region") & (cl.t == t)].groupby("map_name").value.mean()
            res = cp[(cp.metric == "cpc_residual") & (cp.t == t) & (cp.stat == "mean")].value
            rows.append({"edit": name, "t": t, "in_region_jvp": float(inr.get("jvp")),
                         "in_region_ablation": float(inr.get("ablation")), "cpc_residual": float(res.iloc[0])})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--model", default="exp2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", default="overhead,compose,eval")
    ap.add_argument("--eval-n", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(), "loadavg": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": vars(args) | {"out": str(args.out)},
    }
    only = set(args.only.split(","))
    if "overhead" in only:
        res["overhead"] = bench_overhead(args.model, steps=10, batch=4, repeats=args.repeats)
        print(res["overhead"]["ratio_to_plain"], flush=True)
    if "compose" in only:
        res["compose"] = bench_compose(args.model, args.repeats, [1, 2, 4, 8])
        for r in res["compose"]:
            print(r["k"], r["ratio_to_plain"], flush=True)
    if "probes" in only:
        res["probes_under_edits"] = bench_probes_under_edits(args.model, [0.9, 0.5], 2)
    if "eval" in only:
        res["eval"] = bench_eval(args.model, args.eval_n, 6, 25)
        print(res["eval"], flush=True)
    res["machine"]["loadavg_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
