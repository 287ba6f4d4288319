"""MPI worker of tests/test_ensemble.py: a toy ensemble method run through EnsembleRunner.

Usage: mpiexec -n N python tests/mpi/ensemble_worker.py OUT.npz [FAIL_RANK]
The root writes the mean increment and spread of 3 cycles (or the failure message)."""
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from coupler.assim.base import Analysis, Observations  # noqa: E402
from coupler.ensemble import EnsembleRunner, serial_analyse  # noqa: E402


class ToyEnsemble:
    """Members x_b * 0.1 + N(0, 1) from the stream (seed, cycle, member), computed per batch."""

    name, n_members, member_batch = "toy", 7, 2

    def __init__(self, fail_rank: int, rank: int):
        self.fail = fail_rank == rank

    def sample_batches(self, background, observations, *, cycle, batches):
        if self.fail and cycle == 1:
            raise FloatingPointError("injected failure")
        out = [0.1 * background + np.random.default_rng([5, cycle, m]).standard_normal(background.shape)
               for b in batches for m in b]
        return np.stack(out) if out else np.zeros((0, *background.shape))

    def reduce(self, background, increments, observations):
        return Analysis(increments.mean(0), increments.std(0, ddof=1), {"n": len(increments)})


comm = MPI.COMM_WORLD
fail_rank = int(sys.argv[2]) if len(sys.argv) > 2 else -1
method = ToyEnsemble(fail_rank, comm.rank)
runner = EnsembleRunner(method, comm)
x_b = np.arange(12.0).reshape(1, 3, 4)
results = {}
for cycle in range(3):
    if comm.rank == 0:
        if cycle == 2:
            runner.skip()               # a cycle the failure policy skipped: one bcast of None
            continue
        try:
            a = runner.analyse(x_b, Observations.empty(), cycle=cycle)
            s = serial_analyse(method, x_b, Observations.empty(), cycle=cycle)
            results[f"inc{cycle}"], results[f"spread{cycle}"] = a.increment, a.spread
            results[f"serial_equal{cycle}"] = np.array(np.array_equal(a.increment, s.increment)
                                                      and np.array_equal(a.spread, s.spread))
        except RuntimeError as exc:
            results[f"error{cycle}"] = np.array(str(exc))
        runner.skip()
    else:
        runner.serve_cycle()
if comm.rank == 0:
    np.savez(sys.argv[1], **results)
