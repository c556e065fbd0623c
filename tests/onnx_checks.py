"""What the ONNX tests (test_onnx_export.py, test_onnx_import.py, test_onnx_import_nodes.py)
share: an onnxruntime session (CPUExecutionProvider, one thread), the float32 comparison at
1e-5, lstmkit's own forward as the reference, and hand-written LSTM graphs (``onnx.helper``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

RTOL = ATOL = 1e-5  # float32, as the issue states


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _close(case: str, actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, f"{case}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=case)


def _reference(layer, x, lengths, state):
    """lstmkit's own forward: output (padded with zeros past each length) and final states."""
    with torch.no_grad():
        if lengths is None:
            y, st = layer(x, state)
        else:
            xt = x.transpose(0, 1) if layer.batch_first else x
            packed = pack_padded_sequence(xt, lengths, enforce_sorted=False)
            y, st = layer(packed, state)
            y, _ = pad_packed_sequence(y, total_length=xt.shape[0], batch_first=layer.batch_first)
    states = list(st) if isinstance(st, tuple) else [st]
    return [y.numpy()] + [s.numpy() for s in states]


def _same_weights_and_onnxruntime(layer, ref, proto, x, what: str) -> None:
    """``layer`` read from ``proto`` holds ``ref``'s weights exactly and computes onnxruntime's
    Y, Y_h, Y_c on ``x`` (the graph's one input, named ``x``)."""
    for k, v in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    y_ort = _session(proto).run(None, {"x": x.numpy()})
    with torch.no_grad():
        y, (h, c) = layer(x)
    for name, a, b in zip(("Y", "Y_h", "Y_c"), (y, h, c), y_ort):
        _close(f"{what}/{name}", a.numpy(), b)


def _hand_graph(attrs: dict, *, H=3, I=2, D=1, extra_nodes=(), x_name="X", initial_h=None, initial_c=None,
                w_input=False):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((D, 4 * H, H)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.standard_normal((D, 8 * H)).astype(np.float32), "B")]
    if not w_input:
        inits.append(numpy_helper.from_array(rng.standard_normal((D, 4 * H, I)).astype(np.float32), "W"))
    ins = [x_name, "W", "R", "B", "", ""]
    if initial_h is not None:
        inits.append(numpy_helper.from_array(initial_h.astype(np.float32), "h0"))
        ins[5] = "h0"
    if initial_c is not None:
        inits.append(numpy_helper.from_array(initial_c.astype(np.float32), "c0"))
        ins.append("c0")
    nodes = list(extra_nodes) + [helper.make_node("LSTM", ins, ["Y", "Y_h", "Y_c"], hidden_size=H, **attrs)]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])]
    if w_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [D, 4 * H, I]))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")]
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17)]
    return helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
