"""Every numpy function of lorafuse against the PEFT / bitsandbytes golden vectors
(tests/golden, see its README.md), discovered by file-name pattern."""

import numpy as np
import pytest

import lorafuse
from conftest import close, load, params

Y_TOL = 1e-5  # y and merged weights (README "Tolerances")
G_TOL = 5e-5  # gradients


def scalar(d, key):
    return float(d[key][0])


@pytest.mark.parametrize("path", params("lora"))
def test_lora(path):
    d = load(path)
    x, w0, bias, g = d["x"], d["W0"], d["bias"], d["g"]
    a, b, s = d["lora_A.weight"], d["lora_B.weight"], scalar(d, "scaling")
    close(lorafuse.lora_forward(x, w0, a, b, s, bias=bias), d["y"], Y_TOL, name="y")
    close(lorafuse.lora_forward(x, w0, a, b, s), d["y"] - bias, Y_TOL, name="y without bias")
    for h in (None, np.ascontiguousarray(x @ a.T)):
        dx, da, db = lorafuse.lora_backward(g, x, w0, a, b, s, h=h)
        close(dx, d["grad.x"], G_TOL, name="grad.x")
        close(da, d["grad.lora_A.weight"], G_TOL, name="grad.lora_A")
        close(db, d["grad.lora_B.weight"], G_TOL, name="grad.lora_B")
    merged = lorafuse.lora_merge(w0, a, b, s)
    close(merged, d["merged.weight"], Y_TOL, name="merged.weight")
    close(lorafuse.lora_unmerge(merged, a, b, s), w0, Y_TOL, name="unmerged")


@pytest.mark.parametrize("path", params("dora"))
def test_dora(path):
    d = load(path)
    x, w0, bias, g = d["x"], d["W0"], d["bias"], d["g"]
    a, b, s = d["lora_A.weight"], d["lora_B.weight"], scalar(d, "scaling")
    m, n = d["lora_magnitude_vector.weight"], d["weight_norm"]
    close(lorafuse.dora_weight_norm(w0, a, b, s), n, Y_TOL, name="weight_norm")
    for norm in (None, n):
        y = lorafuse.dora_forward(x, w0, a, b, s, m, weight_norm=norm, bias=bias)
        close(y, d["y"], Y_TOL, name="y")
        dx, da, db, dm = lorafuse.dora_backward(g, x, w0, a, b, s, m, weight_norm=norm)
        close(dx, d["grad.x"], G_TOL, name="grad.x")
        close(da, d["grad.lora_A.weight"], G_TOL, name="grad.lora_A")
        close(db, d["grad.lora_B.weight"], G_TOL, name="grad.lora_B")
        close(dm, d["grad.lora_magnitude_vector.weight"], G_TOL, name="grad.magnitude")
        merged = lorafuse.dora_merge(w0, a, b, s, m, weight_norm=norm)
        close(merged, d["merged.weight"], Y_TOL, name="merged.weight")
    close(lorafuse.dora_unmerge(merged, a, b, s, m, n), w0, 1e-4, name="unmerged")
    # The forward's saved state handed to the backward gives the same gradients, bit for bit.
    y, h, z, n2 = lorafuse.dora_forward(x, w0, a, b, s, m, bias=bias, return_saved=True)
    close(y, d["y"], Y_TOL, name="y (return_saved)")
    close(n2, n, Y_TOL, name="weight_norm (return_saved)")
    again = lorafuse.dora_backward(g, x, w0, a, b, s, m, n2, h, z)
    for got, want in zip(again, lorafuse.dora_backward(g, x, w0, a, b, s, m, weight_norm=n2)):
        assert got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="together"):
        lorafuse.dora_backward(g, x, w0, a, b, s, m, n2, h)


@pytest.mark.parametrize("path", params("vera"))
def test_vera(path):
    d = load(path)
    x, w0, bias, g = d["x"], d["W0"], d["bias"], d["g"]
    va, vb = d["vera_A"], d["vera_B"]
    ld, lb = d["vera_lambda_d"], d["vera_lambda_b"]
    close(lorafuse.vera_forward(x, w0, va, vb, ld, lb, bias=bias), d["y"], Y_TOL, name="y")
    h = np.ascontiguousarray(x @ va[:, : x.shape[1]].T)
    for hh in (None, h):
        dx, dld, dlb = lorafuse.vera_backward(g, x, w0, va, vb, ld, lb, h=hh)
        close(dx, d["grad.x"], G_TOL, name="grad.x")
        close(dld, d["grad.vera_lambda_d"], G_TOL, name="grad.lambda_d")
        close(dlb, d["grad.vera_lambda_b"], G_TOL, name="grad.lambda_b")
    merged = lorafuse.vera_merge(w0, va, vb, ld, lb)
    close(merged, d["merged.weight"], Y_TOL, name="merged.weight")
    close(lorafuse.vera_unmerge(merged, va, vb, ld, lb), w0, Y_TOL, name="unmerged")


@pytest.mark.parametrize("path", params("adalora"))
def test_adalora(path):
    d = load(path)
    x, w0, bias, g = d["x"], d["W0"], d["bias"], d["g"]
    a, b, e = d["lora_A"], d["lora_B"], d["lora_E"]
    s, rn = scalar(d, "scaling"), scalar(d, "ranknum")
    y = lorafuse.adalora_forward(x, w0, a, b, e, s, rn, bias=bias)
    close(y, d["y"], Y_TOL, name="y")
    dx, da, db, de = lorafuse.adalora_backward(g, x, w0, a, b, e, s, rn)
    close(dx, d["grad.x"], G_TOL, name="grad.x")
    close(da, d["grad.lora_A"], G_TOL, name="grad.lora_A")
    close(db, d["grad.lora_B"], G_TOL, name="grad.lora_B")
    close(de, d["grad.lora_E"], G_TOL, name="grad.lora_E")
    merged = lorafuse.adalora_merge(w0, a, b, e, s, rn)
    close(merged, d["merged.weight"], Y_TOL, name="merged.weight")
    close(lorafuse.adalora_unmerge(merged, a, b, e, s, rn), w0, Y_TOL, name="unmerged")


def same_bytes(actual, expected, name):
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.tobytes() == expected.tobytes(), f"{name} differs from bitsandbytes"
    print(f"  {name}: {actual.nbytes} bytes equal")


@pytest.mark.parametrize("path", params("nf4"))
def test_nf4(path):
    d = load(path)
    w = d["W"]
    single = lorafuse.nf4.quantize(w, blocksize=64, double_quant=False)
    assert single.shape == w.shape and single.blocksize == 64 and not single.double_quant
    assert single.nested_absmax is None and single.offset is None
    same_bytes(single.packed, d["single.packed"], "single.packed")
    same_bytes(single.absmax, d["single.absmax"], "single.absmax")
    same_bytes(single.quant_map, d["nf4_code"], "quant_map")
    same_bytes(single.dequantize(), d["single.dequant"], "single.dequant")

    dq = lorafuse.nf4.quantize(w)  # defaults: blocksize 64, double quant
    assert dq.double_quant and dq.blocksize == 64 and dq.nested_blocksize == 256
    same_bytes(dq.packed, d["double.packed"], "double.packed")
    same_bytes(dq.absmax, d["double.absmax_q"], "double.absmax (u8)")
    same_bytes(dq.absmax, d["serialized.absmax"], "serialized.absmax")
    same_bytes(dq.nested_quant_map, d["double.nested_code"], "nested_quant_map")
    same_bytes(dq.quant_map, d["serialized.quant_map"], "serialized.quant_map")
    if offset_within_one_ulp(dq.offset, d["double.offset"][0]):
        same_bytes(dq.nested_absmax, d["double.nested_absmax"], "nested_absmax")
        same_bytes(dq.absmax_f32(), d["double.absmax_dequant"], "absmax_f32")
        same_bytes(dq.dequantize(), d["double.dequant"], "double.dequant")
    # From the file's own stored state, every dequantized value is bitsandbytes' exactly.
    stored = lorafuse.nf4.Nf4Tensor.from_bnb(
        {k.replace("serialized.", "w.") if k != "double.packed" else "w": v
         for k, v in d.items() if k.startswith("serialized.") or k == "double.packed"}, "w")
    same_bytes(stored.dequantize(), d["double.dequant"], "double.dequant from the stored state")


def offset_within_one_ulp(ours, theirs):
    """Our double-quant offset (torch's mean(absmax)) is the file's or 1 ulp from it: torch's
    f32 summation order depends on its CPU dispatch. True when they are equal."""
    a = np.array([ours], np.float32).view(np.int32)[0]
    b = np.array([theirs], np.float32).view(np.int32)[0]
    assert abs(int(a) - int(b)) <= 1, f"offset {ours!r} vs the file's {theirs!r}"
    return a == b


@pytest.mark.parametrize("path", params("qlora_nf4"))
def test_qlora_nf4(path):
    """QLoRA: quantizing W reproduces bnb's stored state; LoRA on the dequantized weight
    reproduces PEFT's Linear4bit outputs."""
    d = load(path)
    q = lorafuse.nf4.quantize(d["W_fp32_before_quant"])
    same_bytes(q.packed, d["weight.packed"], "weight.packed")
    same_bytes(q.absmax, d["weight.absmax_q"], "weight.absmax_q")
    if offset_within_one_ulp(q.offset, d["weight.offset"][0]):
        same_bytes(q.nested_absmax, d["weight.nested_absmax"], "weight.nested_absmax")
        same_bytes(q.dequantize(), d["W_dequant"], "W_dequant")
    w0 = d["W_dequant"]
    a, b, s = d["lora_A.weight"], d["lora_B.weight"], float(d["scaling"][0])
    y = lorafuse.lora_forward(d["x"], w0, a, b, s, bias=d["bias"])
    close(y, d["y"], Y_TOL, name="y")
    dx, da, db = lorafuse.lora_backward(d["g"], d["x"], w0, a, b, s)
    close(dx, d["grad.x"], G_TOL, name="grad.x")
    close(da, d["grad.lora_A.weight"], G_TOL, name="grad.lora_A")
    close(db, d["grad.lora_B.weight"], G_TOL, name="grad.lora_B")
