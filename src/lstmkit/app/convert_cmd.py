"""``lstmkit convert SRC DST``: convert a layer's weights between file formats
(:mod:`lstmkit.convert.files` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lstmkit.convert.files import FORMATS, convert_file, file_format
from lstmkit.convert.layer_config import describe_layer

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lstmkit convert``."""
    parser.add_argument("src", type=Path, help=f"the file to read ({', '.join(FORMATS)})")
    parser.add_argument("dst", type=Path, help="the file to write; its extension picks the format")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--cell", default=None,
                        help="the variant of a .pt state dict (e.g. peephole, rnn_relu); files that record "
                             "their variant need none")
    parser.add_argument("--batch-first", action=argparse.BooleanOptionalAction, default=None,
                        help="layout recorded in DST (.safetensors config, .onnx X/Y; Keras files are batch-first, "
                             "a .pt records none); default: SRC's")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset for .onnx (default 17)")
    parser.add_argument("--onnx-initial-states", action="store_true",
                        help="give the .onnx graph inputs initial_h/initial_c")
    parser.add_argument("--onnx-sequence-lens", action="store_true",
                        help="give the .onnx graph the input sequence_lens (padded batches)")
    parser.add_argument("--onnx-method", choices=["auto", "operator", "scan"], default="auto",
                        help="ONNX LSTM/RNN operators, a Scan of the cell's equations, or auto: the operator "
                             "where it can express the variant, else Scan (default)")


def run(args: argparse.Namespace) -> int:
    """``lstmkit convert SRC DST``; returns the exit code (errors are raised, see cli.main)."""
    from lstmkit.app import runs

    if runs.is_run_file(args.dst):  # (its model.safetensors holds the read-out head a layer file lacks)
        raise ValueError(f"DST: {args.dst} names a file of the training run in {Path(args.dst).parent}, which only "
                         f"lstmkit train writes; choose another DST")
    given = {"opset": args.opset, "initial_states": args.onnx_initial_states,
             "sequence_lens": args.onnx_sequence_lens, "method": args.onnx_method}
    # the ONNX options the command line gave (an option at its default is not passed: refused for another DST)
    # (None and False by identity: --opset 0 equals False and was dropped silently)
    onnx_options = {k: v for k, v in given.items() if v is not None and v is not False and v != "auto"}
    layer = convert_file(args.src, args.dst, overwrite=args.overwrite, cell=args.cell, batch_first=args.batch_first,
                         **onnx_options)
    print(f"{args.src} ({file_format(args.src)}) -> {args.dst} ({file_format(args.dst)}): {describe_layer(layer)}")
    return 0
