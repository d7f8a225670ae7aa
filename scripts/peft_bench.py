#!/usr/bin/env python3
"""Time PEFT (torch, CPU, fp32) on the cases of a `lorafuse bench --json` file.

    python scripts/peft_bench.py --cases ours.json --json peft.json [--markdown table.md]

Each case is one PEFT tuner layer on a one-Linear model (no bias), in train mode, dropout 0,
torch.set_num_threads(2) (override with --threads), every trained tensor random and non-zero
(lora_B, lora_magnitude_vector perturbed, vera_lambda_b, lora_E), so no term is trivially
skipped:

* fwd_bwd: y = layer(x) with x.requires_grad (dx is computed, as ours), y.backward(dy);
* merge:   layer.merge() timed alone, then layer.unmerge() untimed (DoRA's merge computes its
           weight norm, as ours).

lora/dora: LoraConfig(use_dora=...); vera: VeraConfig; adalora: AdaLoraConfig (init_r =
target_r = r); qlora/qdora: LoraConfig over a bitsandbytes Linear4bit (nf4, double quant,
blocksize 64, fp32 compute) when bitsandbytes runs on this CPU, otherwise skipped. A case with
"base_dtype": "bf16" holds the frozen base weight in bf16 (the adapter in fp32) and runs under
torch.autocast("cpu", torch.bfloat16), PEFT's bf16 recipe. Median of N (at least 3 runs, more
until --min-time seconds).

Without torch/peft the script says so, and (with --markdown) still writes the table with our
times only. Only the standard library is needed for that.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def machine():
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs (nproc)"


def load_peers():
    """Returns (torch, peft) or raises ImportError with the reason."""
    import torch  # noqa: F401
    import peft  # noqa: F401

    return torch, peft


def build(torch, peft, case, seed):
    """A PEFT layer for the case, plus x and dy."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    out, inp, r, t = case["out"], case["in"], case["r"], max(case["tokens"], 1)
    method = case["method"]

    def rand(*shape, bound=1.0):
        return (torch.rand(*shape, generator=g) * 2 - 1) * bound

    class One(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    w0 = rand(out, inp, bound=inp**-0.5)
    if method in ("qlora", "qdora"):
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(
            inp, out, bias=False, compute_dtype=torch.float32,
            compress_statistics=True, quant_type="nf4",
        )
        lin.weight = bnb.nn.Params4bit(
            w0, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
        )
        lin = lin.to("cpu")
        if not getattr(lin.weight, "bnb_quantized", False):
            lin.weight = lin.weight._quantize("cpu") if hasattr(lin.weight, "_quantize") else None
        if lin.weight is None or not getattr(lin.weight, "bnb_quantized", False):
            raise RuntimeError("bitsandbytes did not quantize on the CPU")
    else:
        lin = nn.Linear(inp, out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w0)
    model = One(lin)

    if method in ("lora", "dora", "qlora", "qdora"):
        cfg = peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=["lin"], lora_dropout=0.0,
            use_dora=method in ("dora", "qdora"),
        )
    elif method == "vera":
        cfg = peft.VeraConfig(r=r, target_modules=["lin"], vera_dropout=0.0, d_initial=0.1)
    elif method == "adalora":
        cfg = peft.AdaLoraConfig(
            init_r=r, target_r=r, lora_alpha=2 * r, target_modules=["lin"], lora_dropout=0.0,
            total_step=1000,
        )
    else:
        raise ValueError(f"unknown method {method}")
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.lin
    with torch.no_grad():
        if method in ("lora", "dora", "qlora", "qdora"):
            layer.lora_B["default"].weight.copy_(rand(out, r, bound=0.05))
            if method in ("dora", "qdora"):
                m = layer.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.01 * (torch.arange(out) % 7).float())
        elif method == "vera":
            layer.vera_lambda_b["default"].copy_(rand(out, bound=0.2))
            layer.vera_lambda_d["default"].copy_(rand(r, bound=0.2))
        elif method == "adalora":
            layer.lora_E["default"].copy_(rand(r, 1))
            layer.lora_B["default"].copy_(rand(out, r, bound=0.05))
    if case.get("base_dtype") == "bf16":
        lin.weight.data = lin.weight.data.to(torch.bfloat16)
        layer.base_layer.weight.data = layer.base_layer.weight.data.to(torch.bfloat16)
    pm.train()
    x = rand(t, inp).requires_grad_(True)
    dy = rand(t, out)
    return layer, x, dy


def time_case(torch, layer, x, dy, op, min_time, min_reps=3, max_reps=50, bf16=False):
    import contextlib

    params = [p for p in layer.parameters() if p.requires_grad]
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def once():
        if op == "fwd_bwd":
            for p in params:
                p.grad = None
            x.grad = None
            t0 = time.perf_counter()
            with cast():
                y = layer(x)
            y.backward(dy.to(y.dtype))
            return time.perf_counter() - t0
        with torch.no_grad():
            t0 = time.perf_counter()
            layer.merge()
            dt = time.perf_counter() - t0
            layer.unmerge()
        return dt

    once()  # warm-up
    ts = []
    while len(ts) < max_reps and (len(ts) < min_reps or sum(ts) < min_time):
        ts.append(once())
    return statistics.median(ts), len(ts)


def torch_peaks(torch, n=2048, reps=5):
    """GFLOP/s of torch's own n^3 matmul in fp32 and bf16 (best of reps): the peaks torch
    reaches on this CPU, the bf16 one through oneDNN's native kernels where the CPU has
    avx512_bf16 or AMX and an emulation where it has neither."""
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.rand(n, n).to(dt)
        b = torch.rand(n, n).to(dt)
        torch.matmul(a, b)
        best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(reps))
        out[name] = 2 * n**3 / best / 1e9
    return out


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def markdown(rows, peft_ok, note):
    peak = rows[0].get("peak_sgemm_gflops") if rows else None
    bw = rows[0].get("peak_copy_gbps") if rows else None
    lines = [
        f"Machine: {machine()}. Date: {datetime.datetime.now().isoformat(timespec='minutes')}.",
        f"Peers: {note}.",
    ]
    if peak:
        lines.append(
            f"Limits measured in the same run: SGEMM peak {peak:.1f} GFLOP/s (lorafuse "
            f"`linear` 2048^3), memory bandwidth {bw:.1f} GB/s (in-place update, read + write)."
        )
    lines += [
        "",
        "| case | lorafuse ms | PEFT ms | PEFT / lorafuse | lorafuse dense GFLOP/s | "
        "% SGEMM peak | % roofline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r.get("peft_s")
        ps = f"{p * 1e3:.3f}" if p else ("skipped" if not peft_ok else r.get("peft_error", "n/a"))
        ratio = f"**{p / r['ours_s']:.2f}x**" if p else "n/a"
        lines.append(
            f"| {r['case']} | {r['ours_s'] * 1e3:.3f} | {ps} | {ratio} | "
            f"{r['gflops']:.1f} | {100 * r['frac_peak_flops']:.0f}% | "
            f"{100 * r['frac_limit']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", required=True, help="JSON list from `lorafuse bench --json`")
    ap.add_argument("--json", help="write the cases with peft_s added here")
    ap.add_argument("--markdown", help="write the comparison table (Markdown) here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    a = ap.parse_args()

    with open(a.cases) as f:
        rows = json.load(f)
    try:
        torch, peft = load_peers()
        peft_ok = True
        torch.set_num_threads(a.threads)
        note = (
            f"PEFT {peft.__version__} on torch {torch.__version__} (CPU, fp32, "
            f"{a.threads} threads), measured in the same run"
        )
    except ImportError as e:
        peft_ok = False
        note = f"PEFT not measured: torch/peft not importable by {sys.executable} ({e})"
        print(f"peft_bench: SKIP: {note}. Set PEERS_PYTHON to a python with torch and peft.",
              file=sys.stderr)

    if peft_ok and any(c.get("base_dtype") == "bf16" for c in rows):
        peaks = torch_peaks(torch)
        note += (
            f"; torch's own 2048^3 matmul in the same run: fp32 {peaks['fp32']:.1f} GFLOP/s, "
            f"bf16 {peaks['bf16']:.1f} GFLOP/s"
        )
        print(f"peft_bench: {note}", flush=True)
    if peft_ok:
        print(f"{'case':<36} {'PEFT ms':>10} {'reps':>5} {'PEFT/ours':>9}")
        for i, case in enumerate(rows):
            try:
                layer, x, dy = build(torch, peft, case, seed=1234 + i)
                s, reps = time_case(torch, layer, x, dy, case["op"], a.min_time,
                                    bf16=case.get("base_dtype") == "bf16")
                case["peft_s"] = s
                print(f"{case['case']:<36} {s * 1e3:>10.3f} {reps:>5} "
                      f"{s / case['ours_s']:>8.2f}x", flush=True)
                del layer, x, dy
            except Exception as e:  # report and go on: one unsupported case is not fatal
                case["peft_error"] = f"{type(e).__name__}"
                print(f"{case['case']:<36} PEFT failed: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    md = markdown(rows, peft_ok, note)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
