"""`gallop bench`: run the benchmark suite and write the report (``benchmarks/report.py``).

The benchmarks live in the source checkout (``benchmarks/`` beside ``gallop_kernels/``), not in the
installed package. This shim holds the command's options and finds the checkout: the current
directory or one of its parents, then the directory the package was imported from (an editable
install). Without a checkout it says how to get one instead of failing obscurely.

Wiring into the CLI: ``bench.register(subparsers)``; the parser's defaults ``handler(args,
subparser)`` (the convention of ``gallop_kernels/cli.py``) and ``func(args)`` both run it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

MODES = ("auto", "quick", "cpu", "gpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode", choices=MODES, default="auto",
        help="auto: gpu on a CUDA machine, else cpu. quick: tiny CPU sizes, seconds (CI). "
             "cpu: small sizes, torch backend. gpu: N from 1e6 to 4e9, Triton kernels.")
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode",
                        help="same as --mode quick")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: benchmarks/results in the checkout)")
    parser.add_argument("--sizes", type=str, default=None,
                        help="comma-separated N to run instead of the mode's (e.g. 1e6,1e7)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="dtype of θ and g (default bfloat16)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--kernels", type=str, default=None,
                        help="comma-separated subset of: selection, sparse_step, optimizer")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 in CPU modes, so a shared machine gives "
                             "stable numbers; unchanged on GPU)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="re-render the Markdown and plots of an existing results JSON; runs nothing")
    parser.add_argument("--tag", type=str, default=None,
                        help="suffix of the output names (default: the mode for quick runs)")


def find_checkout() -> Path | None:
    """Root of a source checkout holding ``benchmarks/report.py``, or None."""
    here = Path.cwd().resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parent.parent]
    for root in candidates:
        if (root / "benchmarks" / "report.py").is_file():
            return root
    return None


def load_report():
    """Import ``benchmarks.report`` from the checkout; raise SystemExit with advice if absent."""
    root = find_checkout()
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module("benchmarks.report")
    except ImportError as exc:
        if root is not None:
            raise
        raise SystemExit(
            "gallop bench: the benchmarks are not part of the installed package; they live in the "
            "source checkout (benchmarks/ beside gallop_kernels/). Clone the repository, "
            "`pip install -e .` there, and run `gallop bench` (or `python -m benchmarks.report`) "
            "from inside it.") from exc


def run(args: argparse.Namespace) -> int:
    return int(load_report().run(args) or 0)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="run the benchmarks and write the report (benchmarks/results/)",
        description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=run, handler=_handle, subparser=parser)
    return parser


def _handle(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gallop bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))
