"""Benchmarks of capture: the cost of each backend, and the memory of streamed vs in-memory captures.

Run on demand (not a test)::

    python bench/bench_capture.py --out docs/bench/capture.json

(a) **Overhead.** In one process, side by side and interleaved (plain, torch, nnsight, plain, ...), so
    that load from other processes hits every variant alike, the median wall time of ``--repeats`` runs:

    * one forward of the tiny SDXL U-Net on a CFG batch ``[uncond; cond]`` vs the same forward while
      capturing every ``attn2`` output with the torch hooks / with nnsight (``capture_nnsight``, which
      wraps and unwraps the U-Net in nnsight per capture; ``nnsight, held envoy`` reuses one wrap);
    * a plain 30-step tiny-SDXL pipeline sampling (``output_type="latent"``: the VAE is not timed) vs the
      same run captured with the hooks / through nnsight's ``DiffusionModel``. All three use the very
      same loaded pipeline object.

(b) **Peak memory.** Every ``attn2`` output over 10, 30 and 100 steps, captured in memory or streamed to
    safetensors shards (``ShardedStore`` with ``--shard-mib`` shards), each configuration in a *fresh
    subprocess* so that peaks do not contaminate each other. The number is the growth of the process's
    peak RSS (``ru_maxrss``, a high-water mark of everything the process touched, torch's CPU allocations
    included) over the peak after a warm-up pipeline run: what the capture itself added. ``tracemalloc`` is
    not used because it does not see torch's allocations. A streamed capture must stay flat in the
    number of steps; an in-memory one grows with the captured bytes.

The JSON holds the machine (platform, CPU count, torch / nnsight versions, threads), the date and all
numbers; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SITES = "*attn2"
PROMPT = "a red cube"
MARK = "BENCH-RESULT "


# --------------------------------------------------------------------------- helpers (worker side)


def _setup(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def _load_pipeline(workdir: Path) -> Any:
    """The tiny SDXL pipeline, saved and loaded as an nnsight ``DiffusionModel`` (one copy for all variants)."""
    from interp.models.sdxl import tiny_sdxl
    from interp.nnsight_backend import load_diffusion_model

    tiny_sdxl(0).save_pretrained(workdir)
    return load_diffusion_model(workdir)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _side_by_side(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median/min seconds of each variant, interleaved round by round after one warm-up round."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn))
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs": len(v)} for k, v in times.items()}


def worker_overhead(cfg: dict[str, Any]) -> dict[str, Any]:
    """Part (a): U-Net forward and 30-step pipeline, plain vs torch hooks vs nnsight."""
    _setup(cfg["threads"])
    import torch

    from interp.capture import capture
    from interp.nnsight_backend import capture_nnsight, capture_pipeline_nnsight, instrumented

    with tempfile.TemporaryDirectory() as tmp:
        model = _load_pipeline(Path(tmp) / "pipe")
    pipe = model.pipeline
    unet = pipe.unet

    # One U-Net call as the pipeline makes it: CFG batch [uncond; cond] of one image.
    gen = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=gen)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}

    @torch.no_grad()
    def forward() -> Any:
        return unet(x, 500, emb, added_cond_kwargs=added).sample

    def torch_forward() -> Any:
        with capture(unet, SITES, cfg="batched"):
            return forward()

    def nnsight_forward() -> Any:
        return capture_nnsight(unet, SITES, forward, calls=1, cfg="batched")

    with instrumented(unet) as held:
        def nnsight_held() -> Any:
            return capture_nnsight(unet, SITES, forward, calls=1, cfg="batched", envoy=held)

        unet_times = _side_by_side(
            {"plain": forward, "torch hooks": torch_forward, "nnsight": nnsight_forward, "nnsight, held envoy": nnsight_held},
            cfg["repeats_forward"],
        )

    steps = cfg["pipeline_steps"]
    call = dict(num_inference_steps=steps, guidance_scale=5.0, output_type="latent")

    def plain_pipe() -> Any:
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images

    def torch_pipe() -> Any:
        with capture(pipe, SITES):
            return plain_pipe()

    def nnsight_pipe() -> Any:
        return capture_pipeline_nnsight(
            model, SITES, PROMPT, num_inference_steps=steps, guidance_scale=5.0,
            pipe_kwargs=dict(generator=torch.Generator().manual_seed(0), output_type="latent"),
        )

    pipe_times = _side_by_side({"plain": plain_pipe, "torch hooks": torch_pipe, "nnsight": nnsight_pipe},
                               cfg["repeats_pipeline"])
    n_sites = sum(1 for p, _ in unet.named_modules() if p.endswith("attn2"))
    return {"unet_forward": unet_times, "pipeline": pipe_times, "sites": SITES, "n_modules": n_sites,
            "latent_hw": [size, size], "pipeline_steps": steps, "cfg_batch": 2}


def _blob_store_class() -> type:
    """The committed ``ShardedStore`` flush, kept here as the "before" of issue 14: the whole shard serialised
    into one bytes blob, written and fsynced on the sampling thread (64 MiB shards by default)."""
    from interp.io import atomic_write, atomic_write_json
    from interp.store import ShardedStore

    class BlobStore(ShardedStore):
        def _flush(self, *, wait: bool, final: bool = False) -> None:
            self._blob_flush()
            if final:  # the committed close(): flush, then the closing index
                self._write_index(closed=self.aborted is None)

        def _blob_flush(self) -> None:
            if not self._buffer:
                return
            from safetensors.torch import save

            name = f"shard-{self._n_shards:05d}"
            blob = save({k.encode(): t for k, t in self._buffer.items()}, metadata={"format": "scorescope-activations"})
            atomic_write(self.root / f"{name}.safetensors", blob)
            sidecar = {k.encode(): {"shape": list(t.shape), "dtype": self._described[k][1], "bytes": self._described[k][2]}
                       for k, t in self._buffer.items()}
            atomic_write_json(self.root / f"{name}.json", sidecar, indent=None)
            for k in self._buffer:
                self._where[k] = f"{name}.safetensors"
            self._written_bytes += self._buffer_bytes
            self._buffer, self._buffer_bytes = {}, 0
            self._n_shards += 1
            self._write_index()

    return BlobStore


def _stream_store(kind: str, root: Path, shard_mib: float | None) -> Any:
    """What a worker passes as ``store=``: the default (a folder), or the "before" blob store."""
    if kind == "stream":  # the default settings: capture opens the folder store itself
        return root
    if kind == "stream-before":
        return _blob_store_class()(root, shard_bytes=int((shard_mib or 64) * 2**20))
    raise ValueError(kind)


def worker_stream_time(cfg: dict[str, Any]) -> dict[str, Any]:
    """Plain sampling of a CLEVR model vs the same run streaming every ``attn2`` output to disk, interleaved."""
    _setup(cfg["threads"])
    import shutil

    import torch  # noqa: F401

    from interp.capture import capture
    from interp.models.registry import load_model
    from interp.sampling import sample

    pipe = load_model(cfg["clevr_model"]).pipeline
    den = pipe.denoiser()
    cond = pipe.conditioning([[0.25, 0.3], [0.7, 0.75]])
    size = den.unet.config.get("sample_size", 32)
    call = dict(shape=(1, den.unet.config.get("in_channels", 3), size, size), num_steps=cfg["clevr_steps"], seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    runs = [0]

    def plain() -> Any:
        with torch.no_grad():
            return sample(den, cond, **call)

    def streamed(kind: str) -> Callable[[], Any]:
        def run() -> Any:
            runs[0] += 1
            root = tmp / f"{kind}-{runs[0]}"
            with torch.no_grad(), capture(den, SITES, store=_stream_store(kind, root, None), budget=None) as cap:
                sample(den, cond, **call)
            cap.store.close()  # the "before" store is the caller's (idempotent for the default one)
            shutil.rmtree(root)  # created by this run
            return cap

        return run

    try:
        def in_memory() -> Any:
            with torch.no_grad(), capture(den, SITES, budget=None) as cap:
                sample(den, cond, **call)
            return cap

        times = _side_by_side({"plain": plain, "in memory": in_memory, "streamed (default)": streamed("stream"),
                               "streamed (before: blob, 64 MiB, sampling thread)": streamed("stream-before")},
                              cfg["repeats_pipeline"])
        with torch.no_grad(), capture(den, SITES) as cap:
            sample(den, cond, **call)
        captured = cap.store.nbytes
    finally:
        shutil.rmtree(tmp)
    return {"times": times, "model": cfg["clevr_model"], "steps": cfg["clevr_steps"], "captured_mib": captured / 2**20,
            "ratios": {k: v["median_s"] / times["plain"]["median_s"] for k, v in times.items()}}


def worker_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    """Part (b): one capture of every attn2 output over ``steps`` steps; growth of the peak RSS."""
    _setup(cfg["threads"])
    import torch

    from interp.capture import capture
    from interp.nnsight_backend import capture_pipeline_nnsight

    steps, backend, kind = cfg["steps"], cfg["backend"], cfg["store"]
    with tempfile.TemporaryDirectory() as tmp:
        model = _load_pipeline(Path(tmp) / "pipe")
        pipe = model.pipeline
        call = dict(guidance_scale=5.0, output_type="latent")
        # Warm-up: a plain run sets the peak of the pipeline itself (activations, allocator pools).
        pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), **call)
        base = _peak_rss_mib()
        store: Any = "memory"
        if kind != "memory":
            store = _stream_store(kind, Path(tmp) / "acts", cfg["shard_mib"])
        t0 = time.perf_counter()
        if backend == "torch":
            with capture(pipe, SITES, store=store, budget=None) as cap:
                pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **call)
        else:
            cap, _ = capture_pipeline_nnsight(
                model, SITES, PROMPT, num_inference_steps=steps, guidance_scale=5.0, store=store, budget=None,
                pipe_kwargs=dict(generator=torch.Generator().manual_seed(0), output_type="latent"),
            )
        seconds = time.perf_counter() - t0
        peak = _peak_rss_mib()
        captured = cap.store.nbytes
        resident = cap.store.resident_bytes
    return {"steps": steps, "backend": backend, "store": kind, "baseline_peak_mib": base, "peak_mib": peak,
            "growth_mib": peak - base, "captured_mib": captured / 2**20, "resident_after_mib": resident / 2**20,
            "seconds": seconds, "tensors": len(cap.store.keys())}


# --------------------------------------------------------------------------- driver


def _in_subprocess(cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARK)]
    if out.returncode or not lines:
        raise RuntimeError(f"benchmark worker {cfg} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def _machine(threads: int) -> dict[str, Any]:
    import nnsight
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "nnsight": nnsight.__version__, "torch_threads": threads,
            "load_avg_at_start": list(os.getloadavg())}


def markdown(result: dict[str, Any]) -> str:
    """The tables printed at the end (and meant for docs/BENCHMARKS.md); sections that did not run are left out."""
    m = result["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, nnsight {m['nnsight']}, "
        f"{m['torch_threads']} torch thread(s), load average at start {m['load_avg_at_start'][0]:.1f}; {result['date']}",
    ]
    ov = result.get("overhead")
    if ov:
        lines += [
            "",
            f"Capture overhead: every `attn2` output ({ov['n_modules']} modules), tiny SDXL, CFG batch 2, "
            f"median of {ov['unet_forward']['plain']['runs']} / {ov['pipeline']['plain']['runs']} interleaved runs",
            "",
            "| workload | plain | torch hooks | nnsight | nnsight, held envoy |",
            "|---|---|---|---|---|",
        ]
        for label, key, unit, scale in (("U-Net forward", "unet_forward", "ms", 1e3),
                                        (f"pipeline, {ov['pipeline_steps']} steps", "pipeline", "s", 1)):
            t = ov[key]
            base = t["plain"]["median_s"]
            cells = []
            for name in ("plain", "torch hooks", "nnsight", "nnsight, held envoy"):
                if name not in t:
                    cells.append("—")
                    continue
                v = t[name]["median_s"]
                cells.append(f"{v * scale:.3g} {unit}" + ("" if name == "plain" else f" (×{v / base:.2f})"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    st = result.get("stream_time")
    if st:
        lines += ["", f"Streamed capture vs plain sampling: {st['model']}, {st['steps']} steps, every `attn2` "
                      f"({st['captured_mib']:.1f} MiB), median of {st['times']['plain']['runs']} interleaved runs", "",
                  "| variant | median | × plain |", "|---|---|---|"]
        for k, v in st["times"].items():
            lines.append(f"| {k} | {v['median_s']:.3f} s | {st['ratios'][k]:.3f} |")
    mem = result.get("memory") or []
    if mem:
        variants = list(dict.fromkeys((r["backend"], r["store"]) for r in mem))
        lines += [
            "",
            "Peak RSS growth over a warm-up run (MiB), every `attn2` output of tiny SDXL; stream = the default "
            "settings (`store=folder`), stream-before = the committed writer (64 MiB blob shards on the sampling "
            "thread); fresh process per cell",
            "",
            "| steps | captured | " + " | ".join(f"{b}, {s}" for b, s in variants) + " |",
            "|---|---|" + "---|" * len(variants),
        ]
        for steps in result["config"]["memory_steps"]:
            row = {(r["backend"], r["store"]): r for r in mem if r["steps"] == steps}
            if not row:
                continue
            captured = next(iter(row.values()))["captured_mib"]
            cells = [f"{row[v]['growth_mib']:.1f}" if v in row else "—" for v in variants]
            lines.append(f"| {steps} | {captured:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "capture.json")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every worker")
    ap.add_argument("--repeats-forward", type=int, default=11)
    ap.add_argument("--repeats-pipeline", type=int, default=5)
    ap.add_argument("--pipeline-steps", type=int, default=30)
    ap.add_argument("--memory-steps", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--shard-mib", type=float, default=None,
                    help="shard size of the 'stream-before' store (default 64, the committed default)")
    ap.add_argument("--memory-variants", nargs="+", default=["torch:memory", "torch:stream", "torch:stream-before"],
                    help="backend:store pairs measured at every step count (store: memory | stream (the default "
                         "settings: a folder) | stream-before (the committed blob writer))")
    ap.add_argument("--clevr-model", default="exp1")
    ap.add_argument("--clevr-steps", type=int, default=20)
    ap.add_argument("--only", default="overhead,stream_time,memory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        cfg = json.loads(args.worker)
        fn = {"overhead": worker_overhead, "stream_time": worker_stream_time, "memory": worker_memory}[cfg["kind"]]
        print(MARK + json.dumps(fn(cfg)), flush=True)
        return

    t0 = time.perf_counter()
    config = {"threads": args.threads, "repeats_forward": args.repeats_forward,
              "clevr_model": args.clevr_model, "clevr_steps": args.clevr_steps,
              "repeats_pipeline": args.repeats_pipeline, "pipeline_steps": args.pipeline_steps,
              "memory_steps": args.memory_steps, "shard_mib": args.shard_mib,
              "memory_variants": args.memory_variants}
    result: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "machine": _machine(args.threads), "config": config}
    sections = set(args.only.split(","))
    if "overhead" in sections:
        print("overhead ...", file=sys.stderr, flush=True)
        result["overhead"] = _in_subprocess({"kind": "overhead", **config})
    if "stream_time" in sections:
        print("stream time ...", file=sys.stderr, flush=True)
        result["stream_time"] = _in_subprocess({"kind": "stream_time", **config})
        print(json.dumps(result["stream_time"], indent=1), file=sys.stderr, flush=True)
    result["memory"] = []
    for steps in args.memory_steps if "memory" in sections else []:
        for variant in args.memory_variants:
            backend, store = variant.split(":")
            print(f"memory: {backend} {store} {steps} steps ...", file=sys.stderr, flush=True)
            result["memory"].append(_in_subprocess({"kind": "memory", "threads": args.threads, "steps": steps,
                                                    "backend": backend, "store": store,
                                                    "shard_mib": args.shard_mib}))
    result["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\nwritten to {args.out} in {result['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
