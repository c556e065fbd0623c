"""Look inside a model: a table of every gate of every lstmkit layer in it (:func:`describe`).

The gates themselves, as views into the layer's storage, are :mod:`lstmkit.gates`.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from torch import nn

from lstmkit.gates import gate_views
from lstmkit.nn import LSTM, RNN, LSTMCell
from lstmkit.spec import gate_slices

__all__ = ["describe"]

def _rows_of(layer: Any) -> list[list[str]]:
    spec = layer.spec
    H, h_out = layer.hidden_size, layer.output_size
    table: list[list[str]] = []
    for index in range(layer.num_layers):
        for d in range(layer.num_directions):
            p = layer.layer_params(index, d)
            I = p["weight_ih"].shape[1]
            rows = gate_slices(spec, H)
            dname = "fwd" if d == 0 else "bwd"
            for name, v in gate_views(layer, index, d).items():
                if not v.present:
                    if spec.is_lstm:
                        table.append([str(index), dname, name, "—", v.note, "", "", "0"])
                    continue
                n = v.W_x.shape[0]
                count = n * (I + h_out // v.heads) + (2 * n if v.b_x is not None else 0)
                extras = []
                if v.heads > 1:  # the textbook W_h is block-diagonal: only the blocks are parameters
                    extras.append(f"W_h {v.heads} blocks of {n // v.heads} × {h_out // v.heads}")
                if v.peephole is not None:
                    extras.append(f"peephole ({H})")
                    count += H
                if spec.layernorm:
                    extras.append(f"LN gains (2×{n})")
                    count += 2 * n
                if spec.fgr and v.letter in spec.sigmoid_gates:
                    k = len(spec.sigmoid_gates) * H
                    extras.append(f"fgr {H} × {k}")
                    count += H * k
                for w, b in v.mlp:
                    extras.append(f"mlp {w.shape[0]} × {w.shape[1]}")
                    count += w.numel() + (b.numel() if b is not None else 0)
                bias = f"{n} + {n}" if v.b_x is not None else "—"
                table.append([str(index), dname, name, v.activation,
                              f"{n} × ({I} + {h_out})", bias, ", ".join(extras), str(count)])
            if spec.layernorm:
                table.append([str(index), dname, "cell norm", "layernorm", "", f"{H}",
                              f"gain ({H})", str(2 * H)])
            if "weight_hr" in p:
                table.append([str(index), dname, "projection", "linear", f"{h_out} × {H}", "—",
                              "", str(h_out * H)])
            assert rows  # every layer computes at least the candidate
    return table


def describe(model: nn.Module, file: IO[str] | None = None) -> str:
    """Print a table of every gate of every layer and direction of ``model``.

    Columns: layer, direction, gate, activation, the textbook weight shape
    ``n × (I + H_out)`` over ``[x_t, h_{t-1}]``, bias, extras (peepholes, norms, fgr, MLP
    layers) and parameter count; then the total, which equals the number of parameters
    of every lstmkit layer in ``model``.

    Args:
        model: an lstmkit LSTM, RNN or LSTMCell, or a module containing one or more.
        file: a text stream to print to (anything with a ``write`` method: an open file,
            ``io.StringIO``); None for ``sys.stdout``. Not a path: pass an open text file, or
            write the returned text.

    Returns:
        The printed text.

    Raises:
        TypeError: ``model`` is not a module, or ``file`` has no ``write`` method (checked before
            the table is built).
        ValueError: ``model`` holds no lstmkit layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an lstmkit LSTM, RNN or LSTMCell (or a module containing one), got "
                        f"{type(model).__name__}")
    if file is not None and not callable(getattr(file, "write", None)):
        hint = " (a path? pass an open text file, or write the returned text)" \
            if isinstance(file, (str, os.PathLike)) else ""
        raise TypeError(f"file: expected a text stream with a write method (an open file, io.StringIO) or None "
                        f"for sys.stdout, got {type(file).__name__}{hint}")
    out: list[str] = []
    total = 0
    layers = [(name or type(model).__name__, m) for name, m in model.named_modules()
              if isinstance(m, (LSTM, RNN, LSTMCell))]
    if not layers:
        raise ValueError(f"model: expected an lstmkit LSTM, RNN or LSTMCell (or a module containing one), "
                         f"got {type(model).__name__} with none inside")
    header = ["layer", "dir", "gate", "activation", "W: n × (I + H)", "bias", "extras", "params"]
    for name, layer in layers:
        rows = _rows_of(layer)
        count = sum(p.numel() for p in layer.parameters())
        total += count
        widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
        kind = f"cell={layer.spec.name!r}" if layer.spec.is_lstm else f"rnn({layer.spec.nonlinearity})"
        out.append(f"{name}: {type(layer).__name__}({layer.input_size} → {layer.hidden_size}"
                   f"{f', proj {layer.proj_size}' if layer.proj_size else ''}), {kind}, "
                   f"{layer.num_layers} layer(s) × {layer.num_directions} direction(s)")
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out.append(fmt.format(*header))
        out.append(fmt.format(*("-" * w for w in widths)))
        out.extend(fmt.format(*r) for r in rows)
        out.append(f"parameters: {count:,}")
        out.append("")
    if len(layers) > 1:
        out.append(f"total parameters: {total:,}")
    text = "\n".join(out).rstrip() + "\n"
    _write(text, file if file is not None else sys.stdout)
    return text


# The table's own symbols spelled in ASCII, for a stream that cannot encode them
_ASCII = str.maketrans({"→": "->", "×": "x"})


def _write(text: str, stream: IO[str]) -> None:
    """Write ``text`` to ``stream``; one whose encoding lacks a character (an ASCII terminal, a
    file opened with ``encoding="ascii"``) gets the table's arrows and crosses in ASCII and any
    other such character (a module's name) as its encoding's replacement."""
    try:
        stream.write(text)
    except UnicodeEncodeError:  # raised before anything is written: the text is encoded whole
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.translate(_ASCII).encode(encoding, errors="replace").decode(encoding))
