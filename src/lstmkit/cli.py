"""The ``lstmkit`` command line: thin wrappers over the library's functions."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lstmkit``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="lstmkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train LSTMs and RNNs on the embedded Reber grammar")
    demo.add_argument("--seeds", type=int, default=5, help="trials per model (default 5)")
    demo.add_argument("--hidden", type=int, default=16, help="cells per layer (default 16)")
    demo.add_argument("--max-sequences", type=int, default=40_000,
                      help="training strings per trial at most (default 40,000)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        for name in ("seeds", "hidden", "max_sequences"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
        from lstmkit.demo import main as demo_main
        demo_main(seeds=args.seeds, hidden=args.hidden, max_sequences=args.max_sequences)
    return 0


if __name__ == "__main__":
    sys.exit(main())
