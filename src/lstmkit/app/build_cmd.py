"""``lstmkit build``: compile the fused CPU kernel ahead of time (otherwise the first layer
that needs it compiles it, once per machine and version; see :mod:`lstmkit.kernels.cpu_ext`)."""

from __future__ import annotations

import argparse

from lstmkit.kernels import cpu_ext


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capability", default=None, choices=sorted(cpu_ext.ISA_FLAGS),
                        help=f"instruction set to build for (default: this CPU's, now {cpu_ext.capability()})")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    parser.add_argument("--prune", action="store_true",
                        help="then remove the cache's builds of other lstmkit versions, sources and environments "
                             "(kept otherwise; another checkout sharing the cache rebuilds its own on next use)")


def run(args: argparse.Namespace) -> int:
    cap = args.capability or cpu_ext.capability()
    where = cpu_ext.build(cap, verbose=args.verbose)
    unloaded = "" if cpu_ext.runs_here(cap) else f" (compiled only: this CPU cannot run {cap} code)"
    print(f"lstmkit: fused CPU kernel for {cap} ready in {where}{unloaded}")
    if args.prune:
        removed = cpu_ext.prune()
        freed = sum(size for _, size in removed)
        print(f"lstmkit: removed {len(removed)} other kernel build(s) from {where.parent}, {freed / 2**20:.1f} MiB")
    return 0
