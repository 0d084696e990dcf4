"""The ``gen-ad`` command line. Subcommands parse arguments and call library functions.

Every user error (bad path, bad value, bad config, unreadable data) prints one line
``gen-ad: error: ...`` and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from gen_ad.errors import GenAdError

Adder = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


# ----------------------------------------------------------------------------- subcommands
# Each _add_* registers one subcommand and sets ``func`` to a handler taking the parsed args.


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gen_ad.config import families
    from gen_ad.training.entry import add_train_arguments

    p = sub.add_parser("train", help="train a generator on normal patches (wgan, stylegan2, ddpm)",
                       description="Train a model family with the shared Accelerate loop. Use "
                       "'accelerate launch -m gen_ad.cli train ...' or train/<family>.py for DDP.")
    p.add_argument("family", choices=families(), help="model family")
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from gen_ad.training.entry import train

    run_dir = train(args.family, args.config, args.overrides, args.resume)
    print(f"run folder: {run_dir}")
    return 0


def _add_groups(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("groups", help="per-slide %% anomalous patches; control vs treated tests",
                       description="Per-slide percentage of patches above a label-free threshold, "
                       "compared between groups (Mann-Whitney U, Welch's t-test, effect sizes).")
    p.add_argument("--scores", nargs="+", required=True, metavar="CSV",
                   help="score tables with path,score[,slide] (slide from <slide>_x.._y...png)")
    p.add_argument("--groups", required=True, metavar="CSV", help="table with slide,group")
    thr = p.add_mutually_exclusive_group(required=True)
    thr.add_argument("--threshold", type=float, help="threshold value (score > T is anomalous)")
    thr.add_argument("--threshold-file", metavar="JSON", help="saved threshold (threshold.json)")
    p.add_argument("--control", default=None,
                   help="reference group (default: 'control' if present, else the first by name)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_cmd_groups)


def _cmd_groups(args: argparse.Namespace) -> int:
    from gen_ad.metrics.stats import format_summary, run_groups

    result = run_groups(args.scores, args.groups, args.out, threshold=args.threshold,
                        threshold_file=args.threshold_file, control=args.control)
    print(format_summary(result))
    print(f"wrote {', '.join(result['outputs'].values())}")
    return 0


def _commands() -> list[Adder]:
    """The subcommands, in the order ``gen-ad --help`` lists them."""
    return [_add_train, _add_groups]


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The full ``gen-ad`` parser."""
    parser = _Parser(prog="gen-ad", description=(
        "Generative models of normal histopathology tissue for unsupervised anomaly detection."))
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _commands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gen-ad``; returns the exit status (0 ok, 2 user error, 1 internal error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        return int(rc or 0)
    except GenAdError as e:
        if args.debug:
            traceback.print_exc()
        print(f"gen-ad: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gen-ad: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last line of defence: no bare traceback for users
        if args.debug:
            raise
        print(f"gen-ad: internal error: {type(e).__name__}: {e} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
