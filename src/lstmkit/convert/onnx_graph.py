"""How a chain of ONNX ``LSTM`` / ``RNN`` nodes must be joined to be one stacked layer, and
what a graph may return from it: the structural half of :func:`lstmkit.convert.from_onnx`
(which reads the nodes' weights and attributes).

The nodes are joined as ``torch.onnx.export(nn.LSTM)`` (both exporters) and
:func:`lstmkit.convert.to_onnx` join them: node 0 reads a graph input (batch-first through
``Transpose(perm=[1, 0, 2])``), each next node the previous node's Y [T, D, B, H] through
``Transpose(perm=[0, 2, 1, 3])`` and a ``Reshape`` to [T, B, D·H] (its shape a constant or read
from the tensor's own shape), or ``Squeeze(axes=[1])`` for one direction; ``Identity`` and an
inference ``Dropout`` pass through. Shapes are followed symbolically (T and B where the graph
does not fix them), so a Reshape that would scramble the layout is told from one that merges it.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

import numpy as np

__all__ = ["node_attributes", "check_stack", "Reader"]

#: Ops walked through between a node and the tensor it reads (or the graph output it
#: gives); which of them, in which order and with which attributes, is then checked.
_DATA_MOVEMENT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Dropout")


def node_attributes(node: Any) -> dict[str, Any]:
    """An ONNX node's attributes by name, as Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


#: Reads a constant's value by name (None if the tensor is not a constant).
Reader = Callable[[str], "np.ndarray | None"]


def _is_inert(node: Any, value: Reader) -> bool:
    """An op that passes its first input through unchanged at inference: ``Identity``, or a
    ``Dropout`` without ``training_mode`` (or with a constant false one)."""
    if node.op_type == "Identity":
        return True
    if node.op_type != "Dropout":
        return False
    mode = node.input[2] if len(node.input) > 2 else ""
    if not mode:
        return True
    training = value(mode)
    return training is not None and training.size == 1 and not bool(training.reshape(()))


def _walk_back(name: str, producer: dict[str, Any], value: Reader) -> tuple[list[Any], str, Any]:
    """From tensor ``name`` back through data-movement ops (each one's first output, read
    from its first input) to the first tensor something else produces.

    Returns:
        The movement ops in data-flow order without the inert ones, the tensor reached, and
        its producer (None for a graph input or a constant).
    """
    ops: list[Any] = []
    seen = {name}
    while True:
        src = producer.get(name)
        if src is None or src.op_type not in _DATA_MOVEMENT or src.domain not in ("", "ai.onnx") \
                or not src.input or name != src.output[0]:
            return ops[::-1], name, src
        if not _is_inert(src, value):
            ops.append(src)
        name = src.input[0]
        if name in seen:  # (an ONNX graph is acyclic; a damaged one would loop here forever)
            raise ValueError(f"the graph has a cycle: tensor {name!r} is computed from itself through "
                             f"{src.op_type} node {src.name!r}")
        seen.add(name)


#: A dimension known symbolically: ``coefficient × product of symbols`` (T and B, the time
#: and batch sizes, when the graph does not fix them).
_Dim = tuple[int, tuple[str, ...]]


def _const_dims(value: np.ndarray) -> list[_Dim] | None:
    if value.dtype.kind not in "iu" or value.ndim > 1:
        return None
    return [(int(v), ()) for v in value.reshape(-1)]


def _shape_value(name: str, producer: dict[str, Any], value: Reader, known: dict[str, list[_Dim]],
                 depth: int = 0) -> list[_Dim] | None:
    """The value of a shape tensor (1-D int64), as dims of the tensors whose shapes are
    ``known``; None when it is computed in another way (or from tensors not known)."""
    if depth > 32:
        return None
    const = value(name)
    if const is not None:
        return _const_dims(const)
    n = producer.get(name)
    if n is None or n.domain not in ("", "ai.onnx") or name != n.output[0]:
        return None
    a = node_attributes(n)

    def arg(i: int) -> list[_Dim] | None:
        return _shape_value(n.input[i], producer, value, known, depth + 1) if len(n.input) > i and n.input[i] \
            else None

    def ints(i: int) -> list[int] | None:
        v = arg(i)
        return None if v is None or any(s for _, s in v) else [c for c, _ in v]

    if n.op_type == "Shape":
        dims = known.get(n.input[0])
        if dims is None:
            return None
        start, end = int(a.get("start", 0)), a.get("end")
        return dims[start:None if end is None else int(end)]
    if n.op_type in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"):
        return arg(0)
    if n.op_type == "Concat":
        parts = [arg(i) for i in range(len(n.input))]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if n.op_type == "Slice":
        data, starts, ends = arg(0), ints(1), ints(2)
        axes = ints(3) if len(n.input) > 3 and n.input[3] else [0]
        steps = ints(4) if len(n.input) > 4 and n.input[4] else [1]
        if data is None or starts is None or ends is None or axes not in ([0], [-1]) or steps != [1] \
                or len(starts) != 1 or len(ends) != 1:
            return None
        return data[starts[0]:ends[0]]
    if n.op_type == "Gather":
        data, index = arg(0), ints(1)
        if data is None or index is None or int(a.get("axis", 0)) != 0 or any(not -len(data) <= i < len(data)
                                                                             for i in index):
            return None
        return [data[i] for i in index]
    if n.op_type == "Mul":
        x, y = arg(0), arg(1)
        if x is None or y is None or len(x) != 1 or len(y) != 1:
            return None
        (cx, sx), (cy, sy) = x[0], y[0]
        return [(cx * cy, tuple(sorted(sx + sy)))]
    return None


def _dim_text(d: _Dim) -> str:
    c, s = d
    return "·".join(([str(c)] if c != 1 or not s else []) + list(s))


def _merge_refusal(ops: list[Any], D: int, H: int, dims: tuple[_Dim, _Dim], source: str,
                   producer: dict[str, Any], value: Reader) -> str | None:
    """Why ``ops`` (data movement applied to a node's Y [T, D, B, H]) do not give the
    [T, B, D·H] that lstmkit's next layer or output reads; None when they do.

    Accepted, as ``torch.onnx.export`` and :func:`lstmkit.convert.to_onnx` write them:
    ``Transpose(perm=[0, 2, 1, 3])`` then ``Reshape`` to [T, B, D·H] (the shape a constant or
    computed from the transposed tensor's own shape), or, for one direction,
    ``Squeeze(axes=[1])``.
    """
    T, B = dims
    want = [T, B, (D * H, ())]
    kinds = [n.op_type for n in ops]
    if kinds == ["Squeeze"]:
        n = ops[0]
        axes = node_attributes(n).get("axes")  # an attribute before opset 13, an input from 13 on
        if axes is None and len(n.input) > 1 and n.input[1]:
            given = _shape_value(n.input[1], producer, value, {})
            axes = None if given is None or any(s for _, s in given) else [c for c, _ in given]
        if D != 1:
            return f"Squeeze cannot merge {D} directions"
        if axes is None or [int(v) for v in axes] not in ([1], [-3]):
            return f"Squeeze with axes={None if axes is None else list(axes)} (expected axes=[1])"
        return None
    if "Dropout" in kinds:
        return "a Dropout that may run in training mode (its training_mode is not a constant false) drops values"
    if kinds != ["Transpose", "Reshape"]:
        return "not a join lstmkit reads"
    perm = [int(v) for v in node_attributes(ops[0]).get("perm", [])]
    if perm != [0, 2, 1, 3]:
        return f"Transpose with perm={perm} (expected [0, 2, 1, 3])"
    reshape = ops[1]
    if len(reshape.input) < 2 or not reshape.input[1]:
        return "a Reshape without a shape input"
    moved = [T, B, (D, ()), (H, ())]
    known = {source: [T, (D, ()), B, (H, ())], ops[0].output[0]: moved}
    target = _shape_value(reshape.input[1], producer, value, known)
    if target is None:
        return f"a Reshape whose shape ({reshape.input[1]!r}) is computed in a way lstmkit does not read"
    shown = "[" + ", ".join(_dim_text(d) for d in target) + "]"
    expected = f"[{_dim_text(T)}, {_dim_text(B)}, {D * H}] (0 and one -1 allowed where they give these)"
    if len(target) != 3:
        return f"a Reshape to {shown}, expected {expected}"
    allowzero = int(node_attributes(reshape).get("allowzero", 0))
    inferred = 0
    for i, d in enumerate(target):
        if d == (0, ()) and not allowzero:
            d = moved[i]
        if d == (-1, ()):
            inferred += 1
        elif d != want[i]:
            return f"a Reshape to {shown}, expected {expected}"
    if inferred > 1:
        return f"a Reshape to {shown}, expected {expected}"
    return None


def _graph_dims(graph: Any, name: str, batch_first: bool) -> tuple[_Dim, _Dim]:
    """(T, B) of the stack's input ``name`` (a graph input): the sizes its declared shape
    fixes, else the symbols T and B."""
    T: _Dim = (1, ("T",))
    B: _Dim = (1, ("B",))
    for v in graph.input:
        if v.name == name and v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 3:
                fixed = [(int(d.dim_value), ()) if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in dims[:2]]
                if batch_first:
                    fixed = fixed[::-1]
                T, B = fixed[0] or T, fixed[1] or B
    return T, B


_MERGE_TEXT = ("Transpose(perm=[0, 2, 1, 3]) then Reshape to [T, B, directions·hidden_size] (or, for one "
               "direction, Squeeze(axes=[1]))")


def check_stack(nodes: list[Any], read: list[dict[str, Any]], graph: Any, value: Reader,
                constants: Container[str], where: str) -> bool:
    """The nodes must be one stack: node 0 reads a graph input (time-major, or batch-first
    through ``Transpose(perm=[1, 0, 2])``), each next node the previous node's Y merged to
    [T, B, D·H] exactly as ``torch.onnx.export`` and :func:`lstmkit.convert.to_onnx` write it,
    and the graph's outputs are what the stack returns (:func:`_check_outputs`). Raises a
    ValueError naming ``where``, the node and the join found otherwise.

    Args:
        nodes: the LSTM (RNN) nodes in order; ``read``: what was read of each (its ``D``,
            ``hidden_size`` and ``layout``).
        value: a constant's value by name (None if the tensor is not a constant);
            ``constants``: the names of the graph's constants.

    Returns:
        Whether the graph input is batch-first.
    """

    producer = {out: n for n in graph.node for out in n.output if out}
    graph_inputs = {v.name for v in graph.input}
    first = nodes[0]
    if len(nodes) > 1 and any(r["layout"] == 1 for r in read):
        raise ValueError(f"{where}: {len(nodes)} {first.op_type} nodes with layout=1; lstmkit reads a stack of "
                         f"time-major (layout=0) nodes, as torch.onnx.export and to_onnx write them (onnxruntime "
                         f"does not run layout=1)")
    ops, name, src = _walk_back(first.input[0], producer, value)
    if src is not None or name not in graph_inputs or name in constants:
        got = "a constant" if name in constants else "a graph input" if src is None else f"a {src.op_type} node"
        raise ValueError(f"{where}: the X input of {first.op_type} node 0 ({first.name!r}) comes from {got} "
                         f"after {[n.op_type for n in ops] or 'no ops'}; expected a graph input, so the nodes "
                         f"cannot be read as one stacked layer")
    batch_first = False
    for n in ops:
        perm = [int(v) for v in node_attributes(n).get("perm", [])] if n.op_type == "Transpose" else None
        if perm != [1, 0, 2]:
            what = f"transposed with perm={perm}" if n.op_type == "Transpose" else f"passed through {n.op_type}"
            raise ValueError(f"{where}: the input of {first.op_type} node 0 is {what}; expected [1, 0, 2] "
                             f"(batch-first to time-major) or no transpose")
        batch_first = not batch_first
    dims = _graph_dims(graph, name, batch_first)
    for k, n in enumerate(nodes[1:], start=1):
        below = nodes[k - 1]
        ops, name, src = _walk_back(n.input[0], producer, value)
        if src is not below or name != below.output[0]:
            got = "a graph input or constant" if src is None else f"a {src.op_type} node"
            raise ValueError(f"{where}: the X input of {n.op_type} node {k} ({n.name!r}) comes from {got} "
                             f"after {[o.op_type for o in ops] or 'no ops'}; expected the Y output of "
                             f"{below.op_type} node {k - 1} through {list(_DATA_MOVEMENT)} only, so the nodes "
                             f"cannot be read as one stacked layer")
        reason = _merge_refusal(ops, read[k - 1]["D"], read[k - 1]["hidden_size"], dims, name, producer, value)
        if reason is not None:
            raise ValueError(f"{where}: the X input of {n.op_type} node {k} ({n.name!r}) is the Y of node {k - 1} "
                             f"through {[o.op_type for o in ops]}: {reason}; lstmkit reads stacked layers joined "
                             f"as torch.onnx.export and to_onnx join them, {_MERGE_TEXT}")
    _check_outputs(nodes, read, graph, producer, value, dims, batch_first, where)
    return batch_first


def _transposed_back(ops: list[Any]) -> tuple[list[Any], int]:
    """``ops`` without its trailing ``Transpose(perm=[1, 0, 2])`` nodes, and how many there were."""
    count = 0
    while ops and ops[-1].op_type == "Transpose" \
            and [int(v) for v in node_attributes(ops[-1]).get("perm", [])] == [1, 0, 2]:
        ops, count = ops[:-1], count + 1
    return ops, count


def _check_outputs(nodes: list[Any], read: list[dict[str, Any]], graph: Any, producer: dict[str, Any],
                   value: Reader, dims: tuple[_Dim, _Dim], batch_first: bool, where: str) -> None:
    """A graph output read from the nodes must be what the layer returns: the last node's Y (as
    the node writes it, or merged to [T, B, D·H] and, for a batch-first input, transposed back),
    a node's Y_h / Y_c, or their ``Concat(axis=0)`` over all the nodes in order. Outputs that
    other ops compute (a head on the stack: a classifier, a decoder) are not the layer's and are
    left out; but the last node must be read by something (else the top layers compute nothing
    the graph returns, and the nodes are not the stack they would make)."""
    last, L = nodes[-1], len(nodes)
    uses_last = False
    head = False
    for out in graph.output:
        ops, name, src = _walk_back(out.name, producer, value)
        prefix = f"{where}: graph output {out.name!r}"
        if src is not None and src in nodes:
            k, slot = nodes.index(src), list(src.output).index(name)
            if slot == 0:
                if k != L - 1:
                    raise ValueError(f"{prefix} is the Y of {src.op_type} node {k} ({src.name!r}), not of the last "
                                     f"node {L - 1}: lstmkit reads a stack whose output is its top layer's")
                merge, transposes = _transposed_back(ops)
                reason = None
                if ops and read[k]["layout"] == 1:
                    reason = "a layout=1 node's Y is read only as the node writes it"
                elif ops and not merge:
                    reason = "the node's Y is transposed without being merged"
                elif merge:
                    reason = _merge_refusal(merge, read[k]["D"], read[k]["hidden_size"], dims, name, producer, value)
                    if reason is None and transposes % 2 != batch_first:
                        reason = (f"the output is {'batch-first' if transposes % 2 else 'time-major'} but the input "
                                  f"is {'batch-first' if batch_first else 'time-major'}")
                if reason is not None:
                    raise ValueError(f"{prefix} is the Y of node {k} through {[o.op_type for o in ops]}: {reason}; "
                                     f"lstmkit reads the Y as the node writes it or as torch.onnx.export and "
                                     f"to_onnx merge it, {_MERGE_TEXT}")
                uses_last = True
                continue
            if not ops:  # Y_h or Y_c as the node writes it
                uses_last = uses_last or k == L - 1
                continue
        if src is not None and src.op_type == "Concat" and not ops and int(node_attributes(src).get("axis", 0)) == 0 \
                and len(src.input) == L:
            parts = [_walk_back(i, producer, value) for i in src.input]
            if all(not o and n is nodes[k] for k, (o, _, n) in enumerate(parts)) \
                    and len({list(n.output).index(nm) for _, nm, n in parts} - {0}) == 1 \
                    and all(list(n.output).index(nm) != 0 for _, nm, n in parts):
                uses_last = True  # the nodes' Y_h (or Y_c) stacked: h_n (c_n)
                continue
        if src is not None and src not in nodes:
            head = True  # computed by other ops from what the stack gives (or from anything else)
            continue
        got = "a graph input or constant" if src is None else f"a {src.op_type} node"
        raise ValueError(f"{prefix} comes from {got} after {[o.op_type for o in ops] or 'no ops'}; lstmkit reads "
                         f"graphs whose outputs are the last node's Y (as written, or merged: {_MERGE_TEXT}), the "
                         f"nodes' Y_h / Y_c, or their Concat(axis=0) over the layers in order (or a head on them)")
    read_by_head = head and any(out in n.input for n in graph.node if n not in nodes for out in last.output if out)
    if not uses_last and not read_by_head:
        raise ValueError(f"{where}: no graph output comes from the last {last.op_type} node ({last.name!r}), "
                         f"so the graph does not compute the {L}-layer stack its nodes would make")
