"""Write ``tests/data/checkpoint_v0_3.pt`` with grng 0.3.0 (run once; the file is committed).

    PYTHONPATH=. python tests/data/make_checkpoint_v0_3.py

For each configuration of ``tests/test_checkpoint_compat.py``'s ``V0_3``: train the small
model ``SAVED_AT`` steps, keep the model's and the optimizer's state dicts, train ``RESUMED``
more steps of the same run and keep the parameters. The test loads the state into a fresh
optimizer of a later grng and must reach those parameters bit for bit.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import grng  # noqa: E402
from grng.optim.cases import make_optimizer  # noqa: E402
from test_checkpoint_compat import RESUMED, SAVED_AT, V0_3, batches, model, train  # noqa: E402

VERSION = "0.3.0"


def _clone(obj):
    """A deep copy with every tensor cloned (the saved state must not alias the live one)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def main() -> None:
    if grng.__version__ != VERSION:
        raise SystemExit(f"this fixture is grng {VERSION}'s; this grng is {grng.__version__}")
    torch.set_num_threads(1)
    data = batches(SAVED_AT + RESUMED)
    runs = {}
    for name, (case, hp) in V0_3.items():
        torch.manual_seed(0)
        net = model()
        opt = make_optimizer(case, net, **hp)
        train(net, opt, data[:SAVED_AT])
        saved = {"model": _clone(net.state_dict()), "optimizer": _clone(opt.state_dict())}
        train(net, opt, data[SAVED_AT:])
        saved["final"] = [p.detach().clone() for p in net.parameters()]
        runs[name] = saved
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                            capture_output=True).stdout.strip()
    torch.save({"grng": grng.__version__, "commit": commit, "runs": runs},
               HERE / "checkpoint_v0_3.pt")


if __name__ == "__main__":
    main()
