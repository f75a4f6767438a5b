"""CPU time of one EKFAC ``opt.step()`` on the demo transformer at the CPU defaults (host gate),
one torch thread: run it from two checkouts in alternation to compare them (the machine is
shared, so CPU time rather than wall time; refresh steps and the first 10 are left out).

    PYTHONPATH=<checkout> python bench/ekfac_host_step.py
"""
import statistics
import time

import torch

import grng
from grng.demo.models import make_model
from grng.demo.tasks import load_data

torch.set_num_threads(1)
torch.manual_seed(0)
model = make_model("transformer")
data = load_data("text")
opt = grng.EKFAC(model, lr=1e-2)
g = torch.Generator().manual_seed(0)
times = []
for i in range(80):
    idx = torch.randint(0, len(data.train), (16,), generator=g)
    x, y = data.train.x[idx], data.train.y[idx]
    opt.zero_grad()
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    loss.backward()
    t = time.process_time()
    opt.step()
    dt = time.process_time() - t
    if i >= 10 and i % 10 != 0:
        times.append(1000 * dt)
print(f"{grng.__file__.split('/grng/')[0]} step CPU-ms median {statistics.median(times):.2f}")
