"""Write ``tests/data/checkpoint_ekfac_v0_3.pt`` with grng 0.3.0 at commit 05d5d76, whose EKFAC
kept its first moment in parameter space (run once; the file is committed).

    PYTHONPATH=. python tests/data/make_checkpoint_ekfac_v0_3.py

(it was run in an export of 05d5d76, ``git archive 05d5d76``, with this file and
``tests/test_ekfac_moment.py`` copied in and ``GRNG_COMMIT=05d5d76``).

For each configuration of ``tests/test_ekfac_moment.py``'s ``CONFIGS``: train its model
``SAVED_AT`` steps, keep the model's and the optimizer's state dicts, train ``RESUMED`` more
steps of the same run and keep the parameters (``final``), and the parameters after every step
of the run, flattened (``trajectory``, one row per step).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import grng  # noqa: E402
from test_ekfac_moment import CONFIGS, RESUMED, SAVED_AT, TokenNet, batches, step  # noqa: E402
from make_checkpoint_v0_3 import _clone  # noqa: E402


def main() -> None:
    if grng.__version__ != "0.3.0":
        raise SystemExit(f"this fixture is grng 0.3.0's; this grng is {grng.__version__}")
    torch.set_num_threads(1)
    data = batches(SAVED_AT + RESUMED)
    runs = {}
    for name, kwargs in CONFIGS.items():
        torch.manual_seed(0)
        net = TokenNet()
        opt = grng.EKFAC(net, **kwargs)
        trajectory = []
        for t, (x, y) in enumerate(data):
            if t == SAVED_AT:
                saved = {"model": _clone(net.state_dict()),
                         "optimizer": _clone(opt.state_dict())}
            step(net, opt, x, y)
            trajectory.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
        saved["final"] = [p.detach().clone() for p in net.parameters()]
        saved["trajectory"] = torch.stack(trajectory)
        runs[name] = saved
    commit = os.environ.get("GRNG_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
        capture_output=True).stdout.strip()
    torch.save({"grng": grng.__version__, "commit": commit, "runs": runs},
               HERE / "checkpoint_ekfac_v0_3.pt")


if __name__ == "__main__":
    main()
