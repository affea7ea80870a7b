"""Speed benchmarks: each writes one JSON file under `<run>/bench/` (never a timed test).

    python -m unclip_mini bench [data prior ar_prior decoder upsampler] [--preset toy] [--peer]

Every file records what it ran on (device, threads, torch version, preset, load average at the end) beside
the timings, so a number quoted in a note or a notebook can say where it came from. `data`, `prior` and
`decoder` time freshly initialised models (no training needed); `ar_prior` and `upsampler` time the run's
trained stages and train them first when they are missing (`stages.load_or_train`).
"""
from __future__ import annotations

import os
import platform
import time

import torch

from .artifacts import atomic_write_json
from .errors import ConfigError

BENCHMARKS = ("data", "prior", "ar_prior", "decoder", "upsampler")


def machine() -> dict:
    """What a timing was measured on."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def run_benchmark(run, name: str, peer: bool = False) -> dict:
    """Run one benchmark on `run`, write `<run>/bench/<name>.json`, return its dict."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    t0 = time.perf_counter()
    if name == "data":
        from .data import benchmark
        result = {f"{r}px": benchmark(run.cfg.data, resolution=r)
                  for r in (run.cfg.data.resolution, 4 * run.cfg.data.resolution)}
    elif name == "prior":
        from .diffusion_prior import benchmark
        result = benchmark(run)
    elif name == "ar_prior":
        from .ar_prior import benchmark
        result = benchmark(run)
    elif name == "decoder":
        from .decoder import benchmark
        result = benchmark(run, peer=peer)
    else:
        from .upsampler import benchmark
        result = benchmark(run)
    out = {"benchmark": name, "preset": run.preset, "device": str(run.device), "wall_s": time.perf_counter() - t0,
           "machine": machine(), "result": result}
    atomic_write_json(out, run.folder.path("bench", f"{name}.json"))
    return out


def main(run, names=None, peer: bool = False) -> dict:
    """Run the named benchmarks (default all), printing one summary line each."""
    names = list(names or BENCHMARKS)
    for n in names:
        if n not in BENCHMARKS:
            raise ConfigError(f"unknown benchmark {n!r}; valid: {', '.join(BENCHMARKS)}")
    results = {}
    for n in names:
        print(f"bench {n} ...", flush=True)
        results[n] = run_benchmark(run, n, peer=peer)
        print(f"  -> {run.folder.path('bench', n + '.json')} ({results[n]['wall_s']:.1f} s)", flush=True)
    return results
