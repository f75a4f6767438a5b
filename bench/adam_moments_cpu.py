"""adam_moments_masked on the CPU: the extension against the reference (one thread; median of 7
interleaved rounds of 20 calls; the machine is shared). ``python bench/adam_moments_cpu.py``;
the figures behind AUTO_ORDER["cpu"] are in bench/results/adam_moments_cpu.md."""
import statistics, time, torch
from grng.ops import masked, ext
torch.set_num_threads(1)
for shape in [(64, 65), (256, 257), (3, 512, 513), (1024, 1025)]:
    V = torch.randn(shape); m = torch.randn(shape); v = torch.rand(shape)
    b = torch.full(shape[:1] if len(shape) == 3 else (), 0.5)
    ok = torch.tensor(True)
    res = {"reference": [], "ext": []}
    for r in range(7):
        for name, fn in (("reference", masked.adam_moments_masked),
                         ("ext", ext.adam_moments_masked)):
            t = time.perf_counter()
            for _ in range(20): fn(V, m, v, 0.9, 0.999, b, b, 1e-8, ok)
            res[name].append((time.perf_counter() - t) / 20 * 1e6)
    r_, e_ = statistics.median(res["reference"]), statistics.median(res["ext"])
    print(f"{shape}: reference {r_:.0f} us, ext {e_:.0f} us, {r_ / e_:.1f}x")
