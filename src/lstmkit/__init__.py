"""lstmkit: the LSTM as its textbook explanations describe it, every variant, fast.

Importing this package compiles nothing; fused kernels are built on first use.
"""

# lstmkit.convert (to_onnx, write_layer, ...) after a plain `import lstmkit`, as the README writes it;
# each format's library loads when a converter uses it
from lstmkit import convert
from lstmkit.freeze import freeze
from lstmkit.gates import GateView
from lstmkit.inspect import describe
from lstmkit.nn import LSTM, RNN, LSTMCell
from lstmkit.spec import PRESETS, CellSpec, resolve
from lstmkit.tracing import gradient_flow, trace

# The result classes: ``from lstmkit.tracing import Trace, GradientFlow``.

__all__ = ["LSTM", "RNN", "LSTMCell", "CellSpec", "PRESETS", "resolve", "describe", "GateView", "trace",
           "gradient_flow", "convert", "freeze"]
__version__ = "0.1.0"
