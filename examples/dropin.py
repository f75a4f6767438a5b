"""The README's drop-in example: five K-FAC steps of a 64-128-10 MLP on 256 random examples.

``python examples/dropin.py`` prints the loss per step; ``tools/readme_numbers.py`` pastes this
file and its output into the README, and tests/test_readme_numbers.py checks they agree.
"""
import torch

import grng

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
opt = grng.KFAC(model, lr=0.05, damping=1e-2)   # was: torch.optim.SGD(model.parameters(), lr=0.05)

for step in range(5):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
