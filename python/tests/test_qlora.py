"""QLoRA / QDoRA through the numpy API: an `nf4.Nf4Tensor` passed as `w0` gives the results of
the same kernels over its dequantized float32 weight (the products dequantize tile by tile), and
merges, which need a float weight, refuse it. Shapes and seeds are this file's own."""

import numpy as np
import pytest

import lorafuse

RNG = np.random.default_rng(2024)


def f32(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def close(a, b, name, tol=2e-5):
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    assert err <= tol * (1.0 + float(np.max(np.abs(b)))), (name, err)


# (T, out, in, r, blocksize): odd sizes, T on both sides of the many-token tile switch (64).
SHAPES = [(3, 37, 70, 4, 64), (80, 130, 96, 8, 32), (1, 16, 256, 1, 128)]


@pytest.mark.parametrize("t,out,inp,r,bs", SHAPES)
def test_lora_over_nf4_equals_lora_over_its_dequantized_weight(t, out, inp, r, bs):
    q = lorafuse.nf4.quantize(f32(out, inp, scale=0.1), blocksize=bs, double_quant=True)
    w = q.dequantize()
    x, a, b, bias, dy = f32(t, inp), f32(r, inp, scale=0.2), f32(out, r, scale=0.2), f32(out), f32(t, out)
    close(lorafuse.lora_forward(x, q, a, b, 0.7, bias), lorafuse.lora_forward(x, w, a, b, 0.7, bias), "y")
    for got, want, name in zip(
        lorafuse.lora_backward(dy, x, q, a, b, 0.7), lorafuse.lora_backward(dy, x, w, a, b, 0.7),
        ["dx", "dA", "dB"],
    ):
        close(got, want, name)


@pytest.mark.parametrize("t,out,inp,r,bs", SHAPES)
def test_dora_over_nf4_equals_dora_over_its_dequantized_weight(t, out, inp, r, bs):
    q = lorafuse.nf4.quantize(f32(out, inp, scale=0.1), blocksize=bs, double_quant=False)
    w = q.dequantize()
    x, a, b, dy = f32(t, inp), f32(r, inp, scale=0.2), f32(out, r, scale=0.2), f32(t, out)
    m = (np.abs(f32(out)) + 0.5).astype(np.float32)
    close(lorafuse.dora_weight_norm(q, a, b, 0.5), lorafuse.dora_weight_norm(w, a, b, 0.5), "n")
    yq, hq, zq, nq = lorafuse.dora_forward(x, q, a, b, 0.5, m, return_saved=True)
    yw, hw, zw, nw = lorafuse.dora_forward(x, w, a, b, 0.5, m, return_saved=True)
    for got, want, name in zip((yq, hq, zq, nq), (yw, hw, zw, nw), ["y", "h", "z", "n"]):
        close(got, want, name)
    gq = lorafuse.dora_backward(dy, x, q, a, b, 0.5, m, nq, hq, zq)
    gw = lorafuse.dora_backward(dy, x, w, a, b, 0.5, m)
    for got, want, name in zip(gq, gw, ["dx", "dA", "dB", "dm"]):
        close(got, want, name)


def test_nf4_w0_shape_and_merge_errors_name_the_argument():
    q = lorafuse.nf4.quantize(f32(12, 64, scale=0.1))
    with pytest.raises(ValueError, match="`w0`"):
        lorafuse.lora_forward(f32(2, 32), q, f32(2, 32), f32(12, 2), 1.0)
    with pytest.raises(ValueError, match="`w0`.*2-D"):
        lorafuse.lora_forward(f32(2, 64), lorafuse.nf4.quantize(f32(768, scale=0.1)), f32(2, 64),
                              f32(12, 2), 1.0)
    with pytest.raises(TypeError, match="`w0`"):
        lorafuse.lora_merge(q, f32(2, 64), f32(12, 2), 1.0)
    with pytest.raises(TypeError, match="`w0`"):
        lorafuse.dora_merge(q, f32(2, 64), f32(12, 2), 1.0, np.ones(12, np.float32))
