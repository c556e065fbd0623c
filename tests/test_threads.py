"""The CPU rows under OpenMP settings users set: a thread limit below torch's thread count
(``OMP_THREAD_LIMIT``; ``OMP_DYNAMIC`` gives smaller teams likewise, by load). torch's oneDNN
computes wrong results with a smaller team than it planned for — its linear layer (which the
fused kernel's input projection called) 0.99 relative off, ``nn.LSTM``'s own training gradients
off by more than their size — so lstmkit calls none of oneDNN's there; checked against a float64
``nn.LSTM`` (which oneDNN does not run) in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import itertools, torch, lstmkit
    from lstmkit.kernels import cpu_ext
    torch.set_num_threads(2)
    print("full teams", cpu_ext.full_omp_teams())
    torch.manual_seed(0)
    worst = 0.0
    # the fused kernel with oneDNN's projection (I·4H >= 256·1024), and oneDNN's RNN (inference, T >= 50)
    for (T, B, I, H), grad in itertools.product([(20, 64, 256, 256), (20, 64, 512, 256), (50, 64, 256, 256)],
                                                (False, True)):
        ours = lstmkit.LSTM(I, H)
        ref = torch.nn.LSTM(I, H, dtype=torch.float64)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(T, B, I)
        xs = [x.clone().requires_grad_(grad), x.double().requires_grad_(grad)]
        with torch.set_grad_enabled(grad):
            outs = [m(v)[0] for m, v in zip((ours, ref), xs)]
        got = [outs]
        if grad:
            got += list(zip(*(torch.autograd.grad(y.sum(), [v, *m.parameters()])
                              for m, v, y in zip((ours, ref), xs, outs))))
        for a, b in got:
            worst = max(worst, ((a.double() - b).abs().max() / b.abs().max()).item())
    print("worst", worst)
""")


@pytest.mark.parametrize("setting", [{"OMP_THREAD_LIMIT": "1"}, {}], ids=["thread-limit-1", "default"])
def test_results_hold_when_openmp_gives_fewer_threads(setting):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")} | setting
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.rsplit(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["full teams"] == str(not setting)
    assert float(lines["worst"]) < 1e-4, out.stdout
