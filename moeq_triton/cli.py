"""The ``moeq-triton`` command line.  Expected failures print one line and exit non-zero."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeq-triton", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moeq-triton {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="quantize a synthetic MoE layer's experts (the default)")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)

    if args.command in (None, "demo"):
        import torch

        from .demo import run_demo

        device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            run_demo(device)
        except (ValueError, TypeError, RuntimeError) as error:
            print(f"moeq-triton: error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
