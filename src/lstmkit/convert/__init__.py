"""Converters between lstmkit's canonical layout and other frameworks' (see ``layout.py``).

Every gate-order fact comes from :mod:`lstmkit.layout`; every converter asserts the
shapes it reads and writes.
"""

from lstmkit.convert.files import convert_file, read_layer, write_layer
from lstmkit.convert.flashrnn import from_flashrnn, to_flashrnn
from lstmkit.convert.keras import from_keras, from_keras_file, to_keras
from lstmkit.convert.onnx import from_onnx, to_onnx
from lstmkit.convert.tf import from_haste, from_tf1, to_haste, to_tf1
from lstmkit.convert.torch import from_torch, to_torch
from lstmkit.convert.xlstm import from_xlstm_slstm

__all__ = ["from_torch", "to_torch", "from_keras", "to_keras", "from_keras_file", "from_tf1", "to_tf1",
           "from_haste", "to_haste", "to_onnx", "from_onnx", "convert_file", "read_layer", "write_layer",
           "from_flashrnn", "to_flashrnn", "from_xlstm_slstm"]
