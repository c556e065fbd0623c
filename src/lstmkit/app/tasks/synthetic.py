"""The built-in synthetic tasks (generated data, no files), registered by name.

=================== ======================================= ===============================
name                source                                  target metric
=================== ======================================= ===============================
``reber``           H&S 1997 §5.1, embedded Reber           ``solved`` = 1 (max)
``continual_reber`` Gers et al. 2000, continual ERG         ``symbol_accuracy`` ≥ 0.999
``adding``          H&S 1997 §5.4; Le 2015 /                 hochreiter: ``accuracy``
                    Arjovsky 2016                           ≥ 1 - 3/2560; le: ``mse`` ≤ 0.01
``temporal_order``  H&S 1997 §5.6                           ``accuracy`` ≥ 1 - 1/2560 (6a)
``copy``            Arjovsky 2016                           ``xent`` ≤ 0.1·10 ln 8/(T+20)
``long_lag``        H&S 1997 §5.2, tasks 2a, 2b, 2c          ``accuracy`` = 1 (10,000 seqs)
``multiplication``  H&S 1997 §5.5                           ``accuracy`` ≥ 1 - 14/2560
``spike_delays``    Gers et al. 2002, MSD                   ``accuracy`` = 1 (every spike)
``timed_spikes``    Gers et al. 2002, GTS                   ``accuracy`` = 1 (every step)
``periodic``        Gers et al. 2002, PFG                   ``max_error`` ≤ 0.3
``counting``        Gers & Schmidhuber 2001, a^n b^n(c^n)   ``generalization`` ≥ 100 (30)
=================== ======================================= ===============================

Every task is a dataclass whose fields are its options (``seed`` always); see each
class's docstring for the exact protocol, the published numbers and the baselines. The
implementations live in :mod:`lstmkit.app.tasks._synth_grammar` (the grammar tasks),
:mod:`lstmkit.app.tasks._synth_memory` (the long-lag memory tasks),
:mod:`lstmkit.app.tasks._synth_lags` (the rest of the 1997 experiments),
:mod:`lstmkit.app.tasks._synth_timing` (the peephole timing tasks) and
:mod:`lstmkit.app.tasks._synth_counting` (the counting languages); importing this module
registers them all.
"""

from __future__ import annotations

from lstmkit.app.tasks._synth_common import derive_seed, last_step
from lstmkit.app.tasks._synth_counting import CountingTask
from lstmkit.app.tasks._synth_grammar import VALID_STRINGS, ContinualReberTask, ReberTask, stream_baselines
from lstmkit.app.tasks._synth_lags import LongLagTask, MultiplicationTask, lag_extra_mean, multiplication_baselines
from lstmkit.app.tasks._synth_memory import AddingTask, CopyTask, TemporalOrderTask, hochreiter_adding_baselines
from lstmkit.app.tasks._synth_timing import PeriodicTask, SpikeDelaysTask, TimedSpikesTask

__all__ = [
    "AddingTask",
    "ContinualReberTask",
    "CopyTask",
    "CountingTask",
    "LongLagTask",
    "MultiplicationTask",
    "PeriodicTask",
    "ReberTask",
    "SpikeDelaysTask",
    "TemporalOrderTask",
    "TimedSpikesTask",
    "VALID_STRINGS",
    "derive_seed",
    "hochreiter_adding_baselines",
    "lag_extra_mean",
    "last_step",
    "multiplication_baselines",
    "stream_baselines",
]
