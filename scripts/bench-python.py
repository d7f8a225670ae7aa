#!/usr/bin/env python3
"""Benchmarks of the Python wheel, run in a venv with torch + peft and the wheel installed
(python/.venv-torch after `bash scripts/test-python-torch.sh`):

    python/.venv-torch/bin/python scripts/bench-python.py [--threads 2] [--min-time 1]
        [--cli target/release/lorafuse] [--markdown out.md]

1. Per-call overhead of the numpy API: (a) a LoRA forward on a tiny shape (T 1, 16x16, r 1),
   whose kernel time is negligible, so the call time bounds the overhead from above; (b) LoRA
   forward + backward (h passed in, as the Rust bench keeps it) on `lorafuse bench --cases
   small`'s shape (256x128, r 8, T 16) from Python, against the same kernels timed in Rust by
   that command (the CLI at --cli, built with `cargo build --release`), same process-free machine
   state, one after the other.
2. A PEFT DoRA layer vs the same layer after `lorafuse.torch.replace_peft_layers`, forward +
   backward (x.requires_grad, y.backward(dy)) on CPU torch, in one run; LoRA for reference.
   One Linear [out, in] without bias, r 16, dropout 0, every trained tensor random and non-zero.

Times are medians over >= 5 runs and >= --min-time seconds after a warm-up.
"""

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def machine():
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def timeit(fn, min_time, min_runs=5):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def overhead(args, rows):
    import lorafuse

    rng = np.random.default_rng(0)

    def f32(*s):
        return rng.standard_normal(s).astype(np.float32)

    x, w0, a, b = f32(1, 16), f32(16, 16), f32(1, 16), f32(16, 1)
    t = timeit(lambda: lorafuse.lora_forward(x, w0, a, b, 2.0), args.min_time)
    rows.append(("lora_forward call, T1 16x16 r1 (kernel ~0: call time = overhead bound)", t * 1e6, None, None))

    out_f, in_f, r, tok = 256, 128, 8, 16
    x, w0, a, b, dy = f32(tok, in_f), f32(out_f, in_f), f32(r, in_f), f32(out_f, r), f32(tok, out_f)
    h = x @ a.T

    def fwd_bwd():
        lorafuse.lora_forward(x, w0, a, b, 2.0)
        lorafuse.lora_backward(dy, x, w0, a, b, 2.0, h)

    fw0 = lorafuse.FrozenWeight(w0)

    def fwd_bwd_frozen():
        lorafuse.lora_forward(x, fw0, a, b, 2.0)
        lorafuse.lora_backward(dy, x, fw0, a, b, 2.0, h)

    t_py = timeit(fwd_bwd, args.min_time)
    t_frozen = timeit(fwd_bwd_frozen, args.min_time)
    t_rs = None
    if os.path.exists(args.cli):
        with tempfile.TemporaryDirectory() as d:
            js = os.path.join(d, "b.json")
            subprocess.run(
                [args.cli, "bench", "--cases", "small", "--filter", "lora fwd", "--device", "cpu",
                 "--json", js, "--min-time", str(args.min_time)],
                check=True, capture_output=True,
            )
            for case in json.load(open(js)):
                if case["method"] == "lora" and case["op"] == "fwd_bwd":
                    t_rs = case["ours_s"]
    for what, t in (("w0 an array", t_py), ("w0 a FrozenWeight", t_frozen)):
        rows.append((
            f"lora fwd+bwd {out_f}x{in_f} r{r} T{tok}, {what}: Python (2 calls) vs Rust kernels",
            t * 1e6, None if t_rs is None else t_rs * 1e6,
            None if t_rs is None else (t - t_rs) / 2 * 1e6,
        ))


def peft_vs_swapped(args, rows):
    import peft
    import torch
    from torch import nn

    import lorafuse.torch as lt

    torch.set_num_threads(args.threads)
    for method, shapes in (("dora", args.dora_shapes), ("lora", args.lora_shapes)):
        for spec in shapes:
            out_f, in_f, tok = (int(v) for v in spec.split("x"))
            torch.manual_seed(0)
            base = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
            cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"], use_dora=method == "dora")
            ref = peft.get_peft_model(base, cfg)
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.randn_like(p))
            ours = copy.deepcopy(ref)
            assert lt.replace_peft_layers(ours, strict=True)
            x = torch.randn(tok, in_f)
            dy = torch.randn(tok, out_f)

            def step(model):
                def run():
                    for p in model.parameters():
                        p.grad = None
                    xr = x.clone().requires_grad_(True)
                    model(xr).backward(dy)
                return run

            t_peft = timeit(step(ref), args.min_time)
            t_ours = timeit(step(ours), args.min_time)
            rows.append((f"{method} fwd+bwd {out_f}x{in_f} r16 T{tok}", t_peft * 1e3, t_ours * 1e3, t_peft / t_ours))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--cli", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "lorafuse"))
    ap.add_argument("--dora-shapes", nargs="*", default=["576x576x16", "1536x576x16", "1536x576x512", "4096x4096x16"])
    ap.add_argument("--lora-shapes", nargs="*", default=["1536x576x16", "1536x576x512"])
    ap.add_argument("--markdown")
    args = ap.parse_args()

    ov, pv = [], []
    overhead(args, ov)
    peft_vs_swapped(args, pv)
    import torch
    import peft
    import lorafuse

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    lines = [
        f"### `scripts/bench-python.py` ({when})",
        "",
        f"{machine()}; lorafuse {lorafuse.__version__}, torch {torch.__version__} "
        f"({args.threads} threads), peft {peft.__version__}, Python {platform.python_version()}.",
        "",
        "| numpy API call | Python µs | Rust kernels alone µs | overhead per call µs |",
        "|---|---|---|---|",
    ]
    for name, py, rs, over in ov:
        lines.append(f"| {name} | {py:.1f} | {'-' if rs is None else f'{rs:.1f}'} | "
                     f"{'<= %.1f' % py if over is None else f'{over:.1f}'} |")
    lines += ["", "| CPU torch layer, fp32 | PEFT ms | lorafuse.torch ms | PEFT / lorafuse |", "|---|---|---|---|"]
    for name, tp, to, ratio in pv:
        lines.append(f"| {name} | {tp:.3f} | {to:.3f} | **{ratio:.2f}x** |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
