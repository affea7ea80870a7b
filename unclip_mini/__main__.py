"""The command line: a thin layer over the library (nothing here that a notebook could not call).

    python -m unclip_mini course [--preset toy] [--out runs/toy] [--only 01 02] [--publish] [--no-ahead]
    python -m unclip_mini sweep 08 --param decoder_guidance 1 3 5 [--set n_eval 192] [--preset toy] [--out runs/toy]
    python -m unclip_mini train STAGE [--preset toy] [--run-dir DIR] [--device auto] [--steps N]
    python -m unclip_mini bench [data prior ar_prior decoder upsampler pipeline] [--preset toy] [--peer]
                                [--batch-size N] [--device cuda]
    python -m unclip_mini generate "a red circle left of a blue square" [-n 4] [--prior diffusion|ar]
                                   [--size 32|128|512] [--seed 0] [--run-dir runs/toy] [--out samples.png]
                                   [--conditioning prior] [--guidance S] [--text-guidance S_T]
    python -m unclip_mini stages
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .config import PRESETS
from .errors import ArtifactError, ConfigError, UnclipError


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
    c.add_argument("--no-ahead", action="store_true",
                   help="do not train the heavy stages in a background process (default: on with 2+ CPU cores)")
    c.add_argument("--quiet", action="store_true", help="do not show each notebook's progress and stage messages")

    w = sub.add_parser("sweep", help="run one notebook once per value of a parameter; gather the metrics")
    w.add_argument("notebook", help="its number, e.g. 08")
    w.add_argument("--param", nargs="+", required=True, metavar=("NAME", "VALUE"),
                   help="the parameter and its values, e.g. --param decoder_guidance 1 3 5")
    w.add_argument("--set", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), dest="fixed",
                   help="another parameter held at one value in every run (repeatable), e.g. --set n_eval 192")
    w.add_argument("--preset", default="toy")
    w.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    w.add_argument("--timeout", type=int, default=None)

    t = sub.add_parser("train", help="train one stage (and what it needs); works under torchrun")
    t.add_argument("stage")
    t.add_argument("--preset", default="toy")
    t.add_argument("--run-dir", default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--steps", type=int, default=None, help="override the stage's training steps")
    t.add_argument("--seed", type=int, default=None)

    b = sub.add_parser("bench", help="speed benchmarks; JSON under <run>/bench/")
    b.add_argument("what", nargs="*", help="data prior ar_prior decoder upsampler pipeline (default: all)")
    b.add_argument("--preset", default="toy")
    b.add_argument("--run-dir", default=None)
    b.add_argument("--device", default="auto")
    b.add_argument("--peer", action="store_true",
                   help="decoder, prior: also time dalle2-pytorch's Unet / DiffusionPrior in its own venv "
                        "($UNCLIP_PEER_PYTHON)")
    b.add_argument("--batch-size", type=int, default=None,
                   help="training batch of every timed step (default: each config's; the paper's need many GPUs)")

    g = sub.add_parser("generate", help="text -> image with the run's trained stages; writes a PNG grid")
    g.add_argument("captions", nargs="+", help="one or more captions (quote each)")
    g.add_argument("-n", type=int, default=4, help="images per caption (default 4)")
    g.add_argument("--prior", default="diffusion", help="diffusion | ar (default diffusion)")
    g.add_argument("--size", default=None, help="side of the output in px: the base, x4 or x16 (default: the largest)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--preset", default="toy")
    g.add_argument("--run-dir", default=None, help="the trained run (default runs/<preset>)")
    g.add_argument("--device", default="auto")
    g.add_argument("--conditioning", default="prior", help="prior | text_embed | caption (§5.1; default prior)")
    g.add_argument("--guidance", type=float, default=None, help="decoder guidance scale (default: its config's)")
    g.add_argument("--text-guidance", type=float, default=None,
                   help="the caption's own decoder guidance scale, apart from z_i's --guidance (default: one scale)")
    g.add_argument("--out", default="samples.png", help="the PNG to write (default samples.png)")

    sub.add_parser("stages", help="list the stages and what they need")

    args = p.parse_args(argv)
    try:
        if args.command == "course":
            from .course import run_course
            return run_course(args.preset, args.out, args.only, args.publish, args.device, args.timeout,
                              ahead=False if args.no_ahead else None, live=not args.quiet)
        if args.command == "sweep":
            from .course import sweep
            if len(args.param) < 2:
                raise ConfigError("--param needs a name and at least one value, e.g. --param decoder_guidance 1 3 5")
            name, values = args.param[0], [_literal(v) for v in args.param[1:]]
            fixed = {k: _literal(v) for k, v in args.fixed}
            print(f"table: {sweep(args.notebook, name, values, args.preset, args.out, args.timeout, fixed=fixed)}")
            return 0
        if args.command == "train":
            from .stages import Run, load_or_train_named, needs_of
            from .train import init_distributed
            needs_of(args.stage)   # a stage or a variant ('upsampler1-noblur'): an unknown name fails here
            device = init_distributed() or args.device
            run = Run(args.preset, run_dir=args.run_dir, device=device, seed=args.seed)
            if int(os.environ.get("RANK", "0")) == 0:
                print(run)
            load_or_train_named(run, args.stage, steps=args.steps)
            return 0
        if args.command == "bench":
            from .bench import main as bench
            from .stages import Run
            bench(Run(args.preset, run_dir=args.run_dir, device=args.device), args.what, peer=args.peer,
                  batch_size=args.batch_size)
            return 0
        if args.command == "generate":
            from .artifacts import check_output_path
            from .stages import Run, default_run_dir, load_pipeline
            from .viz import caption_grid, save_png
            out = check_output_path(args.out, ".png")       # before any work: a bad input writes nothing
            if args.n < 1:
                raise ConfigError(f"-n {args.n}: ask for at least 1 image per caption")
            if args.text_guidance is not None and args.text_guidance < 0:
                raise ConfigError(f"--text-guidance {args.text_guidance}: the caption's scale must be >= 0 "
                                  f"(0 ignores the caption; leave it out for one scale with z_i's)")
            if args.preset not in PRESETS:
                raise ConfigError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
            run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.preset)
            if not run_dir.is_dir():
                raise ArtifactError(f"no trained unCLIP in {run_dir} (the folder does not exist): train every stage "
                                    f"with `python -m unclip_mini course --preset {args.preset} --out {run_dir}`")
            pipe = load_pipeline(Run(args.preset, run_dir=run_dir, device=args.device))
            size = int(args.size) if args.size and args.size.isdigit() else (args.size or pipe.sizes[-1])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pipe.check_captions(args.captions)
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)   # said once above
                result = pipe.generate(args.captions, n_per_caption=args.n, prior=args.prior, seed=args.seed,
                                       size=size, conditioning=args.conditioning, decoder_guidance=args.guidance,
                                       decoder_text_guidance=args.text_guidance,
                                       progress=True)
            save_png(caption_grid(result.final, result.captions, ncol=args.n), out)
            secs = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
            n = len(result.captions)
            print(f"wrote {out}: {n} image{'s' * (n > 1)} of {result.final.shape[-1]} px ({secs})")
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


def _literal(text: str):
    """A command-line value as papermill would take it: an int, a float, True/False/None, else the string."""
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


if __name__ == "__main__":
    sys.exit(main())
