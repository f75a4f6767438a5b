"""Issue 25, the GRU with Kronecker blocks (bench/results/recurrent_tuning.md): are its steps
too large because independence across time underestimates the Fisher (up to T when the
per-step gradients are fully correlated)? Scale the
recurrent blocks' G by c (c = 1: grng; c = T = 63: full correlation; c = 8 between) and run
GRU seed 0 blocks at lr 0.2 / 0.4, damping 0.1 (c = 1 is in the sweep). One thread.

    python bench/recurrent_time_correlation.py
"""
import math
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import torch
from torch import nn
import time_to_target as T
from coverage import stdlib_text, windows
from grng import register_layer
from grng.curvature.recurrent import RecurrentProjection
from grng.curvature.factors import Rows
torch.set_num_threads(1)
T._TEXT.update(stdlib_text()); T._EVAL = windows(T._TEXT["valid"], 64, torch.Generator().manual_seed(1234))
target = T.run("GRU", 0, "AdamW")[50]
for c in (8.0, 63.0):
    class Scaled(RecurrentProjection):
        def g_rows(self, inputs, grads):
            r = super().g_rows(inputs, grads)
            return Rows(r.X, r.n, r.scale * math.sqrt(c))
    for lr in (0.2, 0.4):
        register_layer(nn.GRU, Scaled)  # run() registers the plain helper back afterwards
        curve = T.run("GRU", 0, "K-FAC", settings=dict(lr=lr, damping=0.1), until=target)
        print("c", c, "lr", lr, "steps", T.steps_to(curve, target), "eval@50", curve.get(50), flush=True)
    register_layer(nn.GRU, RecurrentProjection)
