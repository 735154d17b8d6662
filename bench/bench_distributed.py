"""Scaling of a locality sweep from one to two processes (torchrun, CPU, gloo) — raw numbers to docs/bench/distributed.json.

    .venv/bin/python bench/bench_distributed.py [--units 8] [--out docs/bench/distributed.json]

The sweep: ``tiny-clevr``, output site, ``--units`` noise levels × 1 seed, conditional maps (JVP, 4 directions)
and ablation plus the CPC residual — every unit the same cost. Three launches, each with ``torchrun --standalone``,
interleaved for ``--repeats`` rounds (medians reported): one process with one thread, two processes with one
thread each (torchrun's default for several processes), and in the first round one process with two threads. Reported: the launch's wall time (process start, imports, model load
included) and the sweep's own wall time (from the first rank entering the sweep to rank 0 returning the merged
table, measured inside the ranks), plus the load average before and after, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rank_main(folder: Path, units: int) -> None:
    import torch

    from interp.distributed import detect_env
    from interp.io import atomic_write_json
    from probes.sweep import _resolve, locality_sweep

    den, _, cond = _resolve("tiny-clevr", None, None, None, device="cpu")
    levels = [round(0.05 + 0.9 * i / max(1, units - 1), 4) for i in range(units)]
    t0 = time.perf_counter()
    frame = locality_sweep(den, cond, sites="output", t=levels, seeds=[0], out=folder / "sweep", directions=4)
    wall = time.perf_counter() - t0
    env = detect_env()
    if env.is_main:
        atomic_write_json(folder / "timing.json", {"sweep_s": round(wall, 3), "rows": len(frame), "units": units,
                                                    "threads": torch.get_num_threads(), "world_size": env.world_size})


def _launch(nproc: int, threads: int, units: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               "--rank-main", tmp, "--units", str(units)]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        launch = time.perf_counter() - t0
        if run.returncode:
            raise RuntimeError(f"launch failed ({run.returncode}):\n{run.stderr[-3000:]}")
        timing = json.loads((Path(tmp) / "timing.json").read_text())
        results = (Path(tmp) / "sweep" / "results.csv").read_text()
    return {"processes": nproc, "threads_per_process": threads, "launch_s": round(launch, 2), **timing,
            "load_before": [round(v, 2) for v in load0], "load_after": [round(v, 2) for v in os.getloadavg()],
            "_results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three launches")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "distributed.json")
    ap.add_argument("--rank-main", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main is not None:
        _rank_main(args.rank_main, args.units)
        return
    # Interleaved (1x1, 2x1, 1x2) rounds: load from other work hits every configuration alike; medians reported.
    # Two threads in one process is slow here (OpenMP barriers on 2 shared cores): measured in the first round only.
    runs = [_launch(nproc, threads, args.units) for i in range(args.repeats)
            for nproc, threads in ((1, 1), (2, 1), (1, 2)) if i == 0 or threads == 1]
    reference = runs[0]["_results"]
    for r in runs:
        r["results_csv_identical_to_1x1"] = r.pop("_results") == reference
    import statistics

    medians = {}
    for nproc, threads in ((1, 1), (2, 1), (1, 2)):
        mine = [r for r in runs if (r["processes"], r["threads_per_process"]) == (nproc, threads)]
        medians[f"{nproc}x{threads}"] = {k: statistics.median(r[k] for r in mine) for k in ("sweep_s", "launch_s")}
    base = medians["1x1"]["sweep_s"]
    for v in medians.values():
        v["speedup_vs_1x1"] = round(base / v["sweep_s"], 3)
    from interp.io import atomic_write_json
    from scorescope.experiments.locality_sweep import machine

    report = {"medians": medians, "runs": runs, "machine": machine(), "cpu_count": os.cpu_count(),
              "all_results_identical_to_1x1": {f"{r['processes']}x{r['threads_per_process']}": r["results_csv_identical_to_1x1"] for r in runs}}
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
