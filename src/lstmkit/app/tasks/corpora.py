"""Built-in tasks on real data already on the machine (no network).

Importing this module registers:

* ``charlm`` (:class:`CharLM`): character-level LM on the running interpreter's
  standard-library source; stream task; metric ``bpc``; threshold = ``xz -9e`` bpc.
* ``chorales`` (:class:`Chorales`): Bach chorale piano rolls from music21's bundled
  corpus, next-frame prediction; metric ``nll`` (nats per frame). Needs ``music21``.
* ``sunspots`` (:class:`Sunspots`) and ``co2`` (:class:`CO2`): one-step-ahead forecasting
  of statsmodels' bundled series; metric ``rmse`` (original units). Need ``statsmodels``.

The optional frameworks (music21, statsmodels) are imported only when a task first needs
its data, never at import time. Sources and protocols: the module docstrings of
:mod:`lstmkit.app.tasks._charlm`, :mod:`lstmkit.app.tasks._chorales` and
:mod:`lstmkit.app.tasks._series`.
"""

from __future__ import annotations

from lstmkit.app.tasks._charlm import EXCLUDED_DIRS, CharLM, StepFn, sample, stdlib_files, xz_bpc, xz_given_bpc
from lstmkit.app.tasks._chorales import PITCH_HIGH, PITCH_LOW, ChoraleData, Chorales, load_chorales
from lstmkit.app.tasks._series import CO2, SeriesData, Sunspots, load_series

__all__ = [
    "CO2",
    "EXCLUDED_DIRS",
    "PITCH_HIGH",
    "PITCH_LOW",
    "CharLM",
    "ChoraleData",
    "Chorales",
    "SeriesData",
    "StepFn",
    "Sunspots",
    "load_chorales",
    "load_series",
    "sample",
    "stdlib_files",
    "xz_bpc",
    "xz_given_bpc",
]
