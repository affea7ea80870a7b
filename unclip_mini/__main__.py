"""The command line: a thin layer over the library (nothing here that a notebook could not call).

    python -m unclip_mini course [--preset toy] [--out runs/toy] [--only 01 02] [--publish]
    python -m unclip_mini train STAGE [--preset toy] [--run-dir DIR] [--device auto] [--steps N]
    python -m unclip_mini bench [data prior ar_prior decoder upsampler] [--preset toy] [--peer]
    python -m unclip_mini stages
"""
from __future__ import annotations

import argparse
import sys

from .config import PRESETS
from .errors import UnclipError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unclip_mini", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("course", help="execute every notebook with papermill and summarise the figures")
    c.add_argument("--preset", default="toy", help=f"one of {', '.join(PRESETS)} (default toy)")
    c.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    c.add_argument("--only", nargs="*", default=None, help="notebook number prefixes to run, e.g. 01 02")
    c.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    c.add_argument("--publish", action="store_true",
                   help="copy the executed notebooks back over notebooks/ (to commit their outputs)")
    c.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")

    t = sub.add_parser("train", help="train one stage (and what it needs); works under torchrun")
    t.add_argument("stage")
    t.add_argument("--preset", default="toy")
    t.add_argument("--run-dir", default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--steps", type=int, default=None, help="override the stage's training steps")
    t.add_argument("--seed", type=int, default=None)

    b = sub.add_parser("bench", help="speed benchmarks; JSON under <run>/bench/")
    b.add_argument("what", nargs="*", help="data prior ar_prior decoder upsampler (default: all)")
    b.add_argument("--preset", default="toy")
    b.add_argument("--run-dir", default=None)
    b.add_argument("--device", default="auto")
    b.add_argument("--peer", action="store_true",
                   help="decoder: also time dalle2-pytorch's Unet in its own venv ($UNCLIP_PEER_PYTHON)")

    sub.add_parser("stages", help="list the stages and what they need")

    args = p.parse_args(argv)
    try:
        if args.command == "course":
            from .course import run_course
            return run_course(args.preset, args.out, args.only, args.publish, args.device, args.timeout)
        if args.command == "train":
            from .stages import Run, get_stage, load_or_train
            from .train import init_distributed
            get_stage(args.stage)
            device = init_distributed() or args.device
            run = Run(args.preset, run_dir=args.run_dir, device=device, seed=args.seed)
            print(run)
            load_or_train(run, args.stage, steps=args.steps)
            return 0
        if args.command == "bench":
            from .bench import main as bench
            from .stages import Run
            bench(Run(args.preset, run_dir=args.run_dir, device=args.device), args.what, peer=args.peer)
            return 0
        if args.command == "stages":
            from .stages import STAGES
            for s in STAGES.values():
                print(f"{s.name:<16} needs {', '.join(s.needs) or '-':<8} notebook {s.notebook:<20} {s.about}")
            return 0
    except UnclipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
