"""``lstmkit convert SRC DST``: an LSTM's weights from one file format to another.

Formats, by extension (and the variants each carries):

* ``.pt`` / ``.pth`` (every variant): a torch state dict (``torch.save(m.state_dict())``)
  of an ``nn.LSTM`` / ``nn.RNN`` or an lstmkit layer, read only with
  ``torch.load(weights_only=True)``. Sizes, layers, directions, bias and projection are
  inferred from the keys and shapes; the variant cannot be (cifg and nfg have the same
  shapes), so a non-vanilla one needs ``--cell``; a relu RNN needs ``--cell rnn_relu``.
* ``.safetensors`` (every variant): an lstmkit layer's state dict with its configuration
  in the metadata (``{"format": "lstmkit-layer-1", "config": JSON}``). Also reads a
  training run's ``model.safetensors`` / ``checkpoint.safetensors`` (the ``rnn.*`` part;
  the read-out ``head.*`` is dropped with a warning) and a bare state dict (as ``.pt``).
* ``.keras`` (vanilla without projection): a Keras 3 model of LSTM or
  Bidirectional(LSTM) layers, loaded with ``safe_mode=True``; batch-first.
* ``.weights.h5`` (vanilla without projection): the same model's weights alone. The
  architecture is read from the file's layer structure (h5py: group names and shapes
  only), the model rebuilt with :func:`lstmkit.convert.to_keras` and the weights loaded
  by Keras.
* ``.onnx`` (every variant): ``LSTM`` / ``RNN`` nodes where they can express the variant,
  else a ``Scan`` of the cell's equations (:mod:`lstmkit.convert.onnx`).

Nothing read ever executes code from the file (no pickle). ``DST`` is written to a
temporary file in its own directory and moved into place only when complete, so a
failure leaves no partial file and an existing ``DST`` unchanged; an existing ``DST`` is
refused unless ``--overwrite``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lstmkit import _atomic
from lstmkit._validate import check_bool, check_optional_bool, loads_json
from lstmkit.checks import check_dense
from lstmkit.convert._checks import expect_finite_parameters, require_values
from lstmkit.convert.layer_config import (
    Layer,
    check_shapes,
    describe_layer,
    first_line,
    layer_config,
    layer_from_config,
    layer_weights,
)
from lstmkit.nn import LSTM, RNN
from lstmkit.spec import CellSpec, resolve

__all__ = ["convert_file", "read_layer", "write_layer", "file_format", "FORMATS", "SAFETENSORS_FORMAT"]

#: Extension -> format name (``.weights.h5`` is matched before ``.h5`` would be).
FORMATS: dict[str, str] = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors", ".keras": "keras",
                           ".weights.h5": "keras-weights", ".onnx": "onnx"}
#: ``format`` metadata of the ``.safetensors`` files written here.
SAFETENSORS_FORMAT = "lstmkit-layer-1"
_TRAIN_FORMATS = {"lstmkit-weights-1": "", "lstmkit-checkpoint-1": "model."}
_BASE_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
_KEY = re.compile(r"^(?P<base>.+)_l(?P<layer>\d+)(?P<rev>_reverse)?$")



def file_format(path: str | os.PathLike[str], what: str = "path") -> str:
    """The format of ``path`` by its extension (a key of :data:`FORMATS`' values).

    Raises:
        ValueError: an extension no converter reads or writes.
    """
    name = Path(path).name.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext) and len(name) > len(ext):
            return FORMATS[ext]
    raise ValueError(f"{what}: unknown extension of {Path(path).name!r}; expected one of {list(FORMATS)}")



def _load_strict(layer: Layer, tensors: dict[str, Tensor], where: str, what: str) -> Layer:
    """Copy ``tensors`` into ``layer``, refusing missing, unexpected or misshapen keys by name."""
    want = layer.state_dict()
    check_shapes({k: tuple(v.shape) for k, v in want.items()}, {k: tuple(t.shape) for k, t in tensors.items()},
                  where, what)
    for k in want:
        if not tensors[k].dtype.is_floating_point:
            raise ValueError(f"{where}: {k}: expected a floating-point tensor, got {tensors[k].dtype}")
    with torch.no_grad():
        for k, v in want.items():
            v.copy_(tensors[k])
    expect_finite_parameters(layer, where)
    return layer.eval()


# ---------------------------------------------------------------------------- state dicts


def _only_layer(tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """The keys of the one recurrent layer in ``tensors``, its prefix (``rnn.`` …) removed."""
    prefixes = sorted({k[: -len("weight_ih_l0")] for k in tensors if k.endswith("weight_ih_l0")})
    if not prefixes:
        raise ValueError(f"{where}: no 'weight_ih_l0' tensor: expected the state dict of an LSTM or RNN "
                         f"(torch.nn or lstmkit); keys start {sorted(tensors)[:4]}")
    if len(prefixes) > 1:
        raise ValueError(f"{where}: holds {len(prefixes)} recurrent layers (prefixes {prefixes}); expected one")
    prefix = prefixes[0]
    dropped = sorted(k for k in tensors if not k.startswith(prefix))
    if dropped:
        warnings.warn(f"{where}: converting only the recurrent layer {prefix!r}; dropped {len(dropped)} other "
                      f"tensors ({', '.join(dropped[:3])}{'…' if len(dropped) > 3 else ''})", UserWarning,
                      stacklevel=3)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


#: What a state dict's keys and shapes are read as without ``cell``: vanilla LSTM, tanh RNN (_infer_layer).
_BARE_SPECS = (CellSpec(), CellSpec(kind="rnn"))


def _widest_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype of a layer built for ``tensors``: the widest of their floating dtypes, which holds
    every value of each (float16 among float32 tensors: float32), float32 if none is floating
    (refused by name when loaded). A layer computes in one dtype."""
    widest: torch.dtype | None = None
    for t in tensors.values():
        if t.dtype.is_floating_point:
            widest = t.dtype if widest is None else torch.promote_types(widest, t.dtype)
    return widest or torch.float32


def _infer_layer(tensors: dict[str, Tensor], where: str, cell: str | None, batch_first: bool) -> Layer:
    """Rebuild the layer of a bare state dict from its keys and shapes (and ``cell``)."""
    sd = _only_layer(tensors, where)
    layers, bidir, bases = set(), False, set()
    for k in sd:
        m = _KEY.match(k)
        if not m:
            raise ValueError(f"{where}: unexpected key {k!r}; expected names like weight_ih_l0(_reverse)")
        layers.add(int(m["layer"]))
        bidir = bidir or bool(m["rev"])
        bases.add(m["base"])
    L = max(layers) + 1
    if sorted(layers) != list(range(len(layers))):  # (not range(L): a key may name layer 10**20)
        raise ValueError(f"{where}: layers {sorted(layers)} are not numbered 0..{L - 1}")
    w_ih, w_hh = sd["weight_ih_l0"], sd.get("weight_hh_l0")
    if w_hh is None or w_ih.dim() != 2 or w_hh.dim() != 2:
        raise ValueError(f"{where}: weight_ih_l0 and weight_hh_l0 must be 2-D matrices")
    if not w_ih.dtype.is_floating_point:
        raise ValueError(f"{where}: weight_ih_l0: expected a floating-point tensor, got {w_ih.dtype}")
    rows, I = w_ih.shape
    proj = 0
    if "weight_hr_l0" in sd:
        if sd["weight_hr_l0"].dim() != 2:
            raise ValueError(f"{where}: weight_hr_l0 must be a 2-D (proj_size, hidden_size) matrix, got shape "
                             f"{tuple(sd['weight_hr_l0'].shape)}")
        proj, H = sd["weight_hr_l0"].shape
    else:
        H = w_hh.shape[1]  # H / heads with heads (below, once --cell says how many)
    extra = sorted(bases - set(_BASE_KEYS))
    if cell is not None:
        spec = resolve(cell)
    elif extra:
        raise ValueError(f"{where}: holds parameters of an lstmkit variant ({extra}); a state dict does not say "
                         f"which variant: pass --cell NAME (e.g. --cell peephole)")
    elif rows == 4 * H:
        spec = _BARE_SPECS[0]
    elif rows == H and not proj:
        spec = _BARE_SPECS[1]  # nn.RNN; a relu RNN needs --cell rnn_relu
    else:
        raise ValueError(f"{where}: weight_ih_l0 has {rows} rows and weight_hh_l0 {H} columns, which is no vanilla "
                         f"LSTM (4H rows for H columns) or RNN (H for H): pass --cell NAME for the variant it was "
                         f"saved from (with heads=k, weight_hh_l0 holds each head's H/k columns)")
    if not proj:
        H *= spec.heads  # W_hh holds one head's H / heads columns
    kw = dict(num_layers=L, bias="bias_ih" in bases, batch_first=batch_first, bidirectional=bidir,
              dtype=_widest_dtype(sd))
    try:
        if spec.is_lstm:
            layer: Layer = LSTM(I, H, proj_size=proj, cell=spec, **kw)
        else:
            layer = RNN(I, H, nonlinearity=spec.nonlinearity, heads=spec.heads, **kw)
    except ValueError as exc:
        raise ValueError(f"{where}: inferred sizes make no layer: {exc}") from None
    return _load_strict(layer, sd, where, describe_layer(layer))


# ---------------------------------------------------------------------------- readers


#: A compressed record of a .pt file may expand at most this many times (torch.save stores its
#: records uncompressed; a deflated one that expands a thousandfold is built to exhaust memory).
_MAX_EXPANSION = 64


def _check_torch_archive(src: Path) -> None:
    """Refuse a zip-format .pt whose records expand far beyond the file (read from its directory,
    before torch.load would allocate what they claim)."""
    import zipfile

    if not zipfile.is_zipfile(src):
        return  # the legacy format: torch.load's own checks
    try:
        with zipfile.ZipFile(src) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED and \
                        info.file_size > _MAX_EXPANSION * info.compress_size + 2**20:
                    raise ValueError(f"SRC {src}: record {info.filename!r} expands from {info.compress_size:,} to "
                                     f"{info.file_size:,} bytes; torch.save stores records uncompressed")
    except zipfile.BadZipFile as exc:
        raise ValueError(f"SRC {src}: not a torch state dict readable with weights_only=True ({exc})") from None


def _read_torch(src: Path, cell: str | None, batch_first: bool | None) -> Layer:
    _check_torch_archive(src)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"SRC {src}: holds Python objects other than tensors and containers, refused unread "
                         f"(weights_only=True); expected a state dict: torch.save(module.state_dict())") from None
    except Exception as exc:  # UnpicklingError (refused object), RuntimeError/EOFError (corrupt)
        raise ValueError(f"SRC {src}: not a torch state dict readable with weights_only=True "
                         f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"SRC {src}: holds a {type(obj).__name__}, expected a state dict (str -> Tensor) as "
                         f"torch.save(module.state_dict()) writes")
    for k, v in obj.items():
        check_dense(v, f"SRC {src}: {k}", values=True)
    return _infer_layer(dict(obj), f"SRC {src}", cell, bool(batch_first))


def _read_safetensors(src: Path, cell: str | None, batch_first: bool | None) -> Layer:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(src), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"SRC {src}: not a readable safetensors file ({first_line(exc)})") from None
    where = f"SRC {src}"
    fmt = meta.get("format")
    if fmt == SAFETENSORS_FORMAT:
        try:
            cfg = loads_json(meta["config"], "config")
        except KeyError:
            raise ValueError(f"{where}: damaged metadata (no readable 'config')") from None
        except ValueError as exc:  # not JSON, or a key given twice
            raise ValueError(f"{where}: damaged metadata (no readable 'config': {exc})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: damaged metadata ('config' is not an object)")
        layer = layer_from_config(cfg, _widest_dtype(tensors), where, {k: tuple(t.shape) for k, t in tensors.items()})
        _check_cell(layer, cell, where)
        if batch_first is not None:
            layer.batch_first = batch_first
        return _load_strict(layer, tensors, where, describe_layer(layer))
    if fmt in _TRAIN_FORMATS:
        try:
            tc = loads_json(meta["config"], "config")
            prefix = _TRAIN_FORMATS[fmt] + "rnn."
            w = tensors[prefix + "weight_ih_l0"]
            model = tc.get("model", "lstm")  # "lstm" (its variant: cell) or the plain RNN's word (rnn, rnn_relu)
            cfg = {"kind": "lstm" if model == "lstm" else "rnn", "input_size": w.shape[1],
                   "hidden_size": tc["hidden_size"], "num_layers": tc["num_layers"], "bias": True,
                   "batch_first": bool(batch_first), "bidirectional": tc["bidirectional"],
                   "proj_size": tc.get("proj_size", 0), "cell": tc["cell"],
                   **({} if model == "lstm" else {"cell_spec": model})}
        except (KeyError, ValueError, TypeError, AttributeError, IndexError):
            raise ValueError(f"{where}: a training-run file ({fmt}) with damaged metadata or no rnn weights") \
                from None
        own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        layer = layer_from_config(cfg, _widest_dtype(own), where, {k: tuple(t.shape) for k, t in own.items()})
        _check_cell(layer, cell, where)
        others = [k for k in tensors if not k.startswith(prefix)]
        if any(k.startswith(_TRAIN_FORMATS[fmt] + "head.") for k in others):
            warnings.warn(f"{where}: converting the recurrent layer only; the read-out layer (head.*) is dropped",
                          UserWarning, stacklevel=3)
        return _load_strict(layer, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                            where, describe_layer(layer))
    if fmt is not None:
        raise ValueError(f"{where}: metadata format {fmt!r} is not one lstmkit reads; expected "
                         f"{[SAFETENSORS_FORMAT, *_TRAIN_FORMATS]} or a bare state dict")
    return _infer_layer(tensors, where, cell, bool(batch_first))


def _check_cell(layer: Layer, cell: str | None, where: str) -> None:
    if cell is None:
        return
    spec = resolve(cell)
    if spec.without_init() != layer.spec.without_init():
        raise ValueError(f"--cell: {where} records the variant {layer.spec.name!r}, got {cell!r}; "
                         f"leave --cell out for files that carry their variant")


def _read_keras(src: Path, weights_only: bool) -> Layer:
    from lstmkit.convert.keras import from_keras_file, to_keras

    if not weights_only:
        if not zipfile.is_zipfile(src):
            raise ValueError(f"SRC {src}: not a .keras model (a .keras file is a zip archive; this is not one)")
        try:
            return from_keras_file(src, allow_go_backwards=False).eval()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"SRC {src}: {first_line(exc)}") from None
        except Exception as exc:  # zip / h5 / deserialisation errors of a damaged or foreign file
            raise ValueError(f"SRC {src}: not a readable .keras model of LSTM layers "
                             f"({type(exc).__name__}: {first_line(exc)})") from None
    arch = _keras_weights_architecture(src)
    layer = LSTM(arch["input_size"], arch["units"], num_layers=arch["layers"], bias=arch["bias"],
                 bidirectional=arch["bidirectional"], batch_first=True)
    warnings.warn(f"SRC {src}: a .weights.h5 file holds weights only, not the layers' settings; read as the "
                  f"standard Keras LSTM (sigmoid gates, tanh, go_backwards=False). If the model used other "
                  f"activations (e.g. hard_sigmoid) or go_backwards, the converted layer computes something else: "
                  f"convert its .keras file instead, which records them", UserWarning, stacklevel=3)
    try:
        return from_keras_file(src, model=to_keras(layer)).eval()
    except Exception as exc:
        raise ValueError(f"SRC {src}: Keras could not load these weights into {describe_layer(layer)} "
                         f"({type(exc).__name__}: {first_line(exc)})") from None


def _keras_weights_architecture(src: Path) -> dict[str, Any]:
    """Sizes of the LSTM stack whose weights a Keras 3 ``.weights.h5`` holds (shapes only)."""
    import h5py

    where = f"SRC {src}"
    try:
        with h5py.File(src, "r") as fh:
            if "layers" not in fh:
                raise ValueError(f"{where}: no 'layers' group; expected a Keras 3 .weights.h5 file")
            names = [n for n in fh["layers"] if not n.startswith("input_layer")]

            def order(n: str) -> tuple[str, int]:
                base, _, num = n.rpartition("_")
                return (base, int(num)) if num.isdigit() and base else (n, 0)

            names.sort(key=order)
            kinds = {order(n)[0] for n in names}
            if not names or not kinds <= {"lstm", "bidirectional"} or len(kinds) > 1:
                raise ValueError(f"{where}: holds layers {names}; expected only LSTM layers or only "
                                 f"Bidirectional(LSTM) layers")
            bidir = kinds == {"bidirectional"}
            claimed = []  # every dataset's bytes: Keras writes them in full, so they fit in the file
            fh.visititems(lambda _, obj: claimed.append(obj.size * obj.dtype.itemsize)
                          if isinstance(obj, h5py.Dataset) else None)
            if sum(claimed) > src.stat().st_size:
                raise ValueError(f"{where}: its datasets claim {sum(claimed):,} bytes of weights but the file holds "
                                 f"{src.stat().st_size:,}; damaged (refused before building a layer of that size)")
            first = fh["layers"][names[0]]
            cell = (first["forward_layer"] if bidir else first)["cell"]["vars"]
            kernel, recurrent = cell["0"].shape, cell["1"].shape
            return {"input_size": int(kernel[0]), "units": int(recurrent[0]), "layers": len(names),
                    "bidirectional": bidir, "bias": "2" in cell}
    except ValueError:
        raise
    except Exception as exc:  # OSError (not HDF5), KeyError (other structure)
        raise ValueError(f"SRC {src}: not a readable Keras 3 .weights.h5 file of LSTM layers "
                         f"({type(exc).__name__}: {first_line(exc)})") from None


def _read_onnx(src: Path) -> Layer:
    from lstmkit.convert.onnx import from_onnx

    try:
        return from_onnx(src)
    except ValueError as exc:
        raise ValueError(f"SRC {exc}") from None


def read_layer(src: str | os.PathLike[str], *, cell: str | None = None, batch_first: bool | None = None) -> Layer:
    """The lstmkit layer a weights file holds (format by extension; see the module doc).

    Args:
        cell: the variant of a bare state dict (``.pt``), which cannot say; for a file
            that records its variant it must agree or be None.
        batch_first: override the layout (files that do not record it default to False;
            Keras files are batch-first).

    Raises:
        ValueError: missing, unreadable, corrupt or foreign file (the message says which).
    """
    check_optional_bool("batch_first", batch_first)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"SRC: expected a file name (str or os.PathLike), got {type(src).__name__}")
    p = Path(src)
    fmt = file_format(p, "SRC")
    if not p.is_file():
        raise ValueError(f"SRC: no file at {p}")
    if fmt == "torch":
        layer = _read_torch(p, cell, batch_first)
    elif fmt == "safetensors":
        layer = _read_safetensors(p, cell, batch_first)
    else:
        if fmt == "onnx":
            layer = _read_onnx(p)
        else:
            layer = _read_keras(p, weights_only=fmt == "keras-weights")
        _check_cell(layer, cell, f"SRC {p}")
    if batch_first is not None:
        layer.batch_first = batch_first
    return layer


# ---------------------------------------------------------------------------- writers


def _check_carries(layer: Layer, fmt: str, method: str = "auto") -> None:
    if fmt in ("keras", "keras-weights"):
        if isinstance(layer, RNN):
            raise ValueError("DST: Keras files are written with keras.layers.LSTM; the plain RNN cannot be carried")
        from lstmkit.convert.keras import require_keras_lstm
        try:
            require_keras_lstm(layer)
        except ValueError as exc:
            raise ValueError(f"DST: {str(exc).removeprefix('layer: ')}") from None
        if fmt == "keras-weights" and layer.spec.without_init() != _BARE_SPECS[0]:
            # read back, the file is taken for the standard Keras LSTM: the activations would be lost
            raise ValueError(f"DST: a .weights.h5 file holds weights only, not the variant {layer.spec.name!r} "
                             f"(its activations); write a .keras file, which records them")
    elif fmt == "onnx" and method == "operator":
        from lstmkit.convert.onnx import operator_refusal
        reason = operator_refusal(layer)
        if reason is not None:
            raise ValueError(f"DST: onnx: {reason}; --onnx-method scan (or auto) writes the cell's equations as a "
                             f"Scan graph instead")


def _serialize(layer: Layer, fmt: str, onnx_options: dict[str, Any]) -> bytes:
    """The file's bytes, made in memory (so a full disk can only fail the final write,
    which :mod:`lstmkit._atomic` handles, and never a library's own file handling)."""
    state = {k: v.cpu().contiguous().clone() for k, v in layer_weights(layer).items()}
    if fmt == "torch":
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()
    if fmt == "safetensors":
        from safetensors.torch import save
        return save(state, metadata={"format": SAFETENSORS_FORMAT, "config": json.dumps(layer_config(layer))})
    if fmt == "onnx":
        from lstmkit.convert.onnx import to_onnx
        return to_onnx(layer, **onnx_options).SerializeToString()
    from lstmkit.convert.keras import to_keras
    archive = _in_memory(to_keras(layer).save, ".keras")  # type: ignore[arg-type]
    if fmt == "keras":
        return archive
    # A .keras archive holds the weights as "model.weights.h5", the same HDF5 file that
    # model.save_weights writes (same groups, names and shapes). Taken from the archive it
    # is made in memory: h5py writing to a file crashes the process (a segmentation fault
    # in its cleanup) when the disk fills up during the write.
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.read("model.weights.h5")


def _in_memory(save: Any, ext: str) -> bytes:
    """What ``save(path)`` writes, made in memory where the system allows: on Linux the
    path is a link to an anonymous in-memory file (``memfd_create``); elsewhere a
    temporary directory holds it."""
    with _atomic.scratch_directory("convert") as d:
        link = d / f"model{ext}"
        memfd = getattr(os, "memfd_create", None)
        if memfd is None or not Path("/proc/self/fd").is_dir():
            save(str(link))
            return link.read_bytes()
        fd = memfd("lstmkit-convert")
        try:
            os.symlink(f"/proc/self/fd/{fd}", link)
            save(str(link))
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)


def _check_bytes(data: bytes, fmt: str, where: str) -> None:
    """Read the serialised file back before it replaces anything (a writer that produced
    a truncated or empty file fails here, not when the user next opens it)."""
    try:
        if fmt == "torch":
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            ok = isinstance(obj, dict)
        elif fmt == "safetensors":
            from safetensors.torch import load
            ok = isinstance(load(data), dict)
        elif fmt == "onnx":
            import onnx
            ok = onnx.load_model_from_string(data).HasField("graph")
        elif fmt == "keras":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                ok = z.testzip() is None
        else:
            import h5py
            with h5py.File(io.BytesIO(data), "r") as fh:
                ok = "layers" in fh
    except Exception as exc:  # any parse error of our own output
        raise ValueError(f"{where}: the {fmt} writer produced an unreadable file ({first_line(exc)}); "
                         f"nothing was written") from None
    if not ok:
        raise ValueError(f"{where}: the {fmt} writer produced an unexpected file; nothing was written")


def _check_onnx_options(onnx_options: dict[str, Any], fmt: str, dst: str | os.PathLike[str]) -> None:
    """ValueError where ONNX options are given for a DST of another format (they would be dropped)."""
    if onnx_options and fmt != "onnx":
        flags = {"opset": "--opset", "initial_states": "--onnx-initial-states", "sequence_lens": "--onnx-sequence-lens",
                 "method": "--onnx-method"}
        named = ", ".join(f"{k} / {flags[k]}" if k in flags else k for k in onnx_options)
        raise ValueError(f"DST: {named} apply to an .onnx DST only, and {Path(dst).name} is {fmt}; leave them out")


def write_layer(layer: Layer, dst: str | os.PathLike[str], *, overwrite: bool = False,
                **onnx_options: Any) -> Path:
    """Write ``layer`` to ``dst`` in the format of its extension, atomically.

    The file is made in memory, read back, and only then written next to ``dst`` and
    renamed over it (:mod:`lstmkit._atomic`, which first removes the temporary files that
    killed conversions to ``dst`` left behind).

    Args:
        onnx_options: passed to :func:`lstmkit.convert.onnx.to_onnx` (``opset``,
            ``initial_states``, ``sequence_lens``, ``method``) for ``.onnx``.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        ValueError: unknown extension, a variant the format cannot carry, no such directory.
        lstmkit._atomic.WriteError: the file system refused (full, read-only); nothing changed.

    Warns:
        UserWarning: a ``.pt`` of a variant, which a state dict does not record (read it back with
            ``cell=``); only the vanilla LSTM and the tanh RNN read back without it.
    """
    if not isinstance(layer, (LSTM, RNN)):
        raise TypeError(f"layer: expected an lstmkit LSTM or RNN, got {type(layer).__name__}")
    check_bool("overwrite", overwrite)
    p = Path(dst)
    fmt = file_format(p, "DST")
    _check_onnx_options(onnx_options, fmt, p)
    exists = f"DST: {p} exists; pass --overwrite (overwrite=True) to replace it"
    _atomic.check_writable(p, overwrite=overwrite, what="DST", exists_error=exists)
    _check_carries(layer, fmt, onnx_options.get("method", "auto"))
    require_values(layer)
    try:
        data = _serialize(layer, fmt, onnx_options)
    except OSError as exc:  # the temporary directory Keras writes through could not be made
        raise _atomic.WriteError(exc.errno or 5, f"DST: cannot write {p} ({exc.strerror or exc})") from None
    _check_bytes(data, fmt, f"DST {p}")
    written = _atomic.write_bytes(p, data, overwrite=overwrite, what="DST", exists_error=exists)
    if fmt == "torch" and layer.spec.without_init() not in _BARE_SPECS:
        # the keys and shapes say vanilla (or tanh RNN) only: read back alone, some variants would be
        # taken for it and compute something else (hard-sigmoid gates, relu, zoneout, clip)
        warnings.warn(f"DST {p}: a state dict does not record the variant {layer.spec.name!r}; read it back with "
                      f"--cell {layer.spec.name} (cell={layer.spec.name!r}), or write .safetensors, which records "
                      f"it", UserWarning, stacklevel=2)
    return written


def convert_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False,
                 cell: str | None = None, batch_first: bool | None = None, **onnx_options: Any) -> Layer:
    """Convert the layer in ``src`` to ``dst`` (formats by extension); returns the layer.

    Args:
        overwrite: replace an existing ``dst`` (otherwise FileExistsError, ``dst`` unchanged).
        cell: the variant of a ``.pt`` state dict (files that record theirs need none).
        batch_first: the layout to record in ``dst`` (default: ``src``'s).
        onnx_options: ``opset``, ``initial_states``, ``sequence_lens``, ``method`` for an ``.onnx``
            ``dst`` (see :func:`lstmkit.convert.onnx.to_onnx`); refused for another format.

    Raises:
        ValueError: unreadable ``src``, unknown extension, a variant ``dst`` cannot carry, an option
            ``dst``'s format does not take.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
    """
    check_bool("overwrite", overwrite)
    check_optional_bool("batch_first", batch_first)
    fmt = file_format(dst, "DST")  # fail before reading anything
    file_format(src, "SRC")
    if batch_first is not None and fmt == "torch":
        raise ValueError(f"DST: a state dict ({Path(dst).suffix}) records no layout, so batch_first / "
                         f"--[no-]batch-first would be lost; leave it out (the module that loads it sets its own)")
    _check_onnx_options(onnx_options, fmt, dst)
    if batch_first is False and fmt in ("keras", "keras-weights"):
        raise ValueError("DST: Keras layers are batch-first (batch, time, features); a Keras file cannot record "
                         "batch_first=False / --no-batch-first")
    if Path(dst).exists() and Path(src).exists() and os.path.samefile(src, dst):
        raise ValueError(f"DST: {dst} is SRC itself; converting a file onto itself would replace what it holds "
                         f"(a run's model file: its read-out head) with the layer alone; choose another DST")
    _atomic.check_writable(dst, overwrite=overwrite, what="DST",
                           exists_error=f"DST: {dst} exists; pass --overwrite (overwrite=True) to replace it")
    layer = read_layer(src, cell=cell, batch_first=batch_first)
    write_layer(layer, dst, overwrite=overwrite, **(onnx_options if fmt == "onnx" else {}))
    return layer
