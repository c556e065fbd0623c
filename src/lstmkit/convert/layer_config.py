"""A layer's configuration as JSON and back: what the file formats (safetensors metadata, the
ONNX Scan graph's metadata) record so that a layer can be rebuilt exactly, and the checks
that come with rebuilding one from a file (shapes before allocation)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lstmkit.nn import LSTM, RNN
from lstmkit.spec import CellSpec, resolve

__all__ = ["Layer", "layer_config", "layer_weights", "layer_from_config", "check_shapes", "describe_layer",
           "first_line"]

Layer = LSTM | RNN


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def layer_config(layer: Layer) -> dict[str, Any]:
    """Everything needed to rebuild ``layer`` (JSON-ready): sizes, flags and the full CellSpec."""
    spec = dataclasses.asdict(layer.spec)
    spec["gate_hidden"] = [[g, list(w)] for g, w in layer.spec.gate_hidden]
    return {"kind": "rnn" if isinstance(layer, RNN) else "lstm", "input_size": layer.input_size,
            "hidden_size": layer.hidden_size, "num_layers": layer.num_layers, "bias": layer.bias,
            "batch_first": layer.batch_first, "bidirectional": layer.bidirectional, "proj_size": layer.proj_size,
            "dropout": layer.dropout, "cell": layer.spec.name, "cell_spec": spec}


def layer_weights(layer: Layer | torch.nn.RNNBase) -> dict[str, torch.Tensor]:
    """Every parameter of ``layer`` — an lstmkit LSTM / RNN, or a ``torch.nn.LSTM`` / ``RNN``: both name
    theirs in ``_flat_weights_names`` — by its state-dict name (``weight_ih_l0``, ...) as the layer computes
    with it, detached: a parametrized one (``torch.nn.utils.parametrizations.weight_norm``,
    ``register_parametrization``) computed from its parametrization, a hook-computed one (``prune``,
    the hook-based ``weight_norm``) as its hook last set it — where ``state_dict()`` holds the
    parametrization's or the pruning's own tensors under other names, which no format reads back."""
    return {name: getattr(layer, name).detach() for name in layer._flat_weights_names}


def layer_from_config(cfg: dict[str, Any], dtype: torch.dtype, where: str,
                      shapes: dict[str, tuple[int, ...]] | None = None, extra_ok: bool = False) -> Layer:
    """The (uninitialised) layer a :func:`layer_config` mapping describes.

    Args:
        shapes: the parameter shapes the file holds; when given they are checked against
            the configuration *before* anything is allocated (a layer is first built on the
            ``meta`` device), so a damaged or hostile configuration cannot ask for
            gigabytes. ``extra_ok``: names the layer does not have are allowed.

    Raises:
        ValueError: a damaged or impossible configuration, or shapes that do not match it
            (``where`` names the file).
    """
    if shapes is not None:
        layers = _field(cfg, "num_layers", int, where)
        if layers > len(shapes):  # (each layer holds tensors of its own; a probe of 2**31 layers, even
            # on the meta device, would take minutes and gigabytes to build)
            raise ValueError(f"{where}: damaged configuration in the metadata: num_layers={layers}, but the file "
                             f"holds {len(shapes)} tensors")
        probe = _make_layer(cfg, dtype, where, "meta")
        check_shapes({k: tuple(v.shape) for k, v in probe.state_dict().items()}, shapes, where, describe_layer(probe),
                      extra_ok)
    return _make_layer(cfg, dtype, where, None)


def _field(cfg: Any, key: str, kind: type, where: str, default: Any = None) -> Any:
    """``cfg[key]`` if it is of JSON type ``kind`` (int: not a bool; float: an int too), else a
    ValueError naming the file: a string "false" or a 4.5 where lstmkit writes a bool or an int is
    a damaged file, not a value to convert."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: damaged configuration in the metadata (not a JSON object)")
    if key not in cfg and default is None:
        raise ValueError(f"{where}: damaged configuration in the metadata (no {key!r})")
    value = cfg.get(key, default)
    ok = isinstance(value, bool) if kind is bool else \
        isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
    if not ok:
        expected = {bool: "boolean", int: "integer", float: "number", str: "string"}[kind]
        raise ValueError(f"{where}: damaged configuration in the metadata ({key}: expected a JSON {expected}, "
                         f"got {value!r})"[:300])
    return value


def _make_layer(cfg: dict[str, Any], dtype: torch.dtype, where: str, device: str | None) -> Layer:
    kw = dict(num_layers=_field(cfg, "num_layers", int, where), bias=_field(cfg, "bias", bool, where),
              batch_first=_field(cfg, "batch_first", bool, where),
              bidirectional=_field(cfg, "bidirectional", bool, where),
              dropout=float(_field(cfg, "dropout", float, where, 0.0)), dtype=dtype, device=device)
    sizes = (_field(cfg, "input_size", int, where), _field(cfg, "hidden_size", int, where))
    kind = _field(cfg, "kind", str, where)
    proj_size = _field(cfg, "proj_size", int, where, 0)
    try:
        if kind == "rnn":
            spec = resolve(cfg["cell_spec"]) if "cell_spec" in cfg else CellSpec(kind="rnn")
            return RNN(*sizes, nonlinearity=spec.nonlinearity, heads=spec.heads, **kw)
        if kind != "lstm":
            raise ValueError(f"kind: expected 'lstm' or 'rnn', got {kind!r}")
        spec = resolve(cfg["cell_spec"]) if "cell_spec" in cfg else resolve(cfg["cell"])
        return LSTM(*sizes, proj_size=proj_size, cell=spec, **kw)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: damaged configuration in the metadata ({first_line(exc)})") from None


def check_shapes(want: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], where: str, what: str,
                  extra_ok: bool = False) -> None:
    missing = [k for k in want if k not in got]
    unexpected = [] if extra_ok else [k for k in got if k not in want]
    if missing or unexpected:
        raise ValueError(f"{where}: its tensors do not match {what}: missing {missing[:4]}"
                         f"{'…' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{'…' if len(unexpected) > 4 else ''}")
    for k, shape in want.items():
        if tuple(got[k]) != tuple(shape):
            raise ValueError(f"{where}: {k}: expected shape {tuple(shape)} for {what}, got {tuple(got[k])}")


def describe_layer(layer: Layer) -> str:
    """``lstmkit.LSTM(3, 4, …)``: the layer as its messages name it."""
    name = type(layer).__name__
    return f"lstmkit.{name}({layer.extra_repr()})"
