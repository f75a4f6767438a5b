"""The policy of the distributed phases (grng/distributed/plan.py) runs on a communicator's verbs
alone: a communicator that only re-defines ``reduce_sum`` (two ranks that saw the same batch:
every sum twice this rank's part, formed as it would travel) and shares its inverses through
``broadcast_from`` takes the summed fold (divide by the count, blend) and the broadcast refresh,
and must end where one process's fused fold ends, to rounding. No process group is started."""
from __future__ import annotations

import pytest

from grng.distributed.communicator import Communicator, LocalCommunicator
from grng.optim.cases import make_optimizer
from grng.testing import classification_batches, compare_optimizers, small_mlp


class TwoEqualRanks(LocalCommunicator):
    """Verbs of two ranks with equal batches: sums of two equal parts, inverses shared."""

    masks_folds = False
    masked_folds = Communicator.masked_folds

    def __init__(self, counts: float = 2.0) -> None:
        super().__init__()
        self.counts = counts  # what the count sums to (2: right; anything else: a wrong verb)

    def reduce_sum(self, parts, dests):
        out = []
        for part in parts:
            total = part.total()
            out.append(part.summed(None if total is None else 2.0 * total, self.counts * part.count))
        return out

    def shares_inverse(self, index: int) -> bool:
        return True


def _with(comm_factory, name: str, **hp):
    def make(model):
        opt = make_optimizer(name, model, lr=0.1, damping=1e-2, inverse_every=2, **hp)
        opt.comm = comm_factory()
        return opt
    return make


# bars: K-FAC's rounding; EKFAC's Adam ratios amplify it (test_fsdp's bar, 1e-9)
@pytest.mark.parametrize("name,hp,bar", [("kfac-eigen", {}, 1e-12),
                                         ("kfac-newton", {"sync_free": True}, 1e-12),
                                         ("ekfac", {}, 1e-9)])
def test_the_summed_fold_and_shared_refresh_equal_one_process(name: str, hp: dict,
                                                               bar: float) -> None:
    model, batches = small_mlp(), classification_batches(6)
    local = _with(LocalCommunicator, name, **hp)
    out = compare_optimizers(local, _with(TwoEqualRanks, name, **hp), model, batches)
    assert out.max_param_diff < bar
    moved = compare_optimizers(local, lambda m: make_optimizer("sgd", m, lr=0.0), model, batches)
    assert moved.max_param_diff > 1e-3  # the runs train: the bar above means something


def test_a_wrong_reduction_is_seen() -> None:
    """Counts that do not add up (a broken verb) give another factor, and other parameters."""
    model, batches = small_mlp(), classification_batches(6)
    out = compare_optimizers(_with(LocalCommunicator, "kfac-eigen"),
                             _with(lambda: TwoEqualRanks(counts=1.0), "kfac-eigen"), model, batches)
    assert out.max_param_diff > 1e-6
