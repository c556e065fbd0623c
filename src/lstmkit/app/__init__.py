"""The experiment application built on the library: the classic tasks, training, run
directories, plots, the report, the variant study, the demo and the command line.

The library (``lstmkit.spec``, ``cell``, ``nn``, ``kernels``, ``convert``, ``inspect``,
``tracing``, …) never imports this package; ``tests/test_architecture.py`` checks it.
"""
