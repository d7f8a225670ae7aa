"""Bad arguments raise TypeError/ValueError naming the argument, never a Rust panic."""

import threading

import numpy as np
import pytest

import lorafuse

T, IN, OUT, R = 3, 8, 6, 2
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def lora_args():
    return dict(x=f32(T, IN), w0=f32(OUT, IN), lora_A=f32(R, IN), lora_B=f32(OUT, R), scaling=2.0)


def test_version_and_module_layout():
    assert isinstance(lorafuse.__version__, str)
    from lorafuse.nf4 import Nf4Tensor, quantize  # noqa: F401  (import path works)

    assert "[T, in]" in lorafuse.lora_forward.__doc__
    assert "ValueError" in lorafuse.lora_forward.__doc__


def test_ok_baseline():
    y = lorafuse.lora_forward(**lora_args())
    assert y.shape == (T, OUT) and y.dtype == np.float32


@pytest.mark.parametrize(
    "arg, bad, exc, words",
    [
        ("x", [[1.0] * IN] * T, TypeError, ["`x`", "numpy.ndarray", "list"]),
        ("x", np.ones((T, IN), np.float64), TypeError, ["`x`", "float32", "float64"]),
        ("w0", np.ones((OUT, IN), np.int32), TypeError, ["`w0`", "float32"]),
        ("x", np.ones((T, IN, 1), np.float32), ValueError, ["`x`", "2-D", "(3, 8, 1)"]),
        ("lora_A", np.ones((R, IN + 1), np.float32), ValueError, ["`lora_A`", "[r, in=8]", "(2, 9)"]),
        ("lora_B", np.ones((OUT, R + 1), np.float32), ValueError, ["`lora_B`", "[out=6, r=2]"]),
        ("w0", np.ones((OUT, IN + 1), np.float32), ValueError, ["`w0`", "[out, in=8]", "(6, 9)"]),
        ("x", np.ones((IN, T), np.float32).T, ValueError, ["`x`", "C-contiguous"]),
        ("w0", np.ones((OUT, 2 * IN), np.float32)[:, ::2], ValueError, ["`w0`", "C-contiguous"]),
        ("scaling", float("nan"), ValueError, ["`scaling`", "finite"]),
        ("scaling", "two", TypeError, ["`scaling`", "float", "str"]),
    ],
)
def test_lora_forward_bad_argument(arg, bad, exc, words):
    kw = lora_args()
    kw[arg] = bad
    with pytest.raises(exc) as e:
        lorafuse.lora_forward(**kw)
    msg = str(e.value)
    print(f"{exc.__name__}: {msg}")
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("arg", ["x", "w0", "lora_A", "lora_B"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_names_argument(arg, value):
    kw = lora_args()
    kw[arg] = kw[arg].copy()
    kw[arg].flat[1] = value
    with pytest.raises(ValueError, match=f"`{arg}` must be finite.*flat index 1"):
        lorafuse.lora_forward(**kw)


def test_bias_checked():
    kw = lora_args()
    with pytest.raises(ValueError, match=r"`bias` must have shape \[out=6\]"):
        lorafuse.lora_forward(**kw, bias=np.ones(OUT + 1, np.float32))
    with pytest.raises(TypeError, match="`bias`"):
        lorafuse.lora_forward(**kw, bias=np.ones(OUT, np.float16))


def test_backward_checks_dy_and_h():
    kw = lora_args()
    with pytest.raises(ValueError, match=r"`dy` must have shape \[T=3, out=6\]"):
        lorafuse.lora_backward(f32(T, OUT + 1), **kw)
    with pytest.raises(ValueError, match=r"`h` must have shape \[T=3, r=2\]"):
        lorafuse.lora_backward(f32(T, OUT), **kw, h=f32(T, R + 1))


def test_merge_returns_new_array():
    kw = lora_args()
    w0 = kw["w0"]
    before = w0.copy()
    merged = lorafuse.lora_merge(w0, kw["lora_A"], kw["lora_B"], 2.0)
    assert np.array_equal(w0, before) and merged is not w0
    np.testing.assert_allclose(merged, w0 + 2.0 * kw["lora_B"] @ kw["lora_A"], atol=1e-5)


def test_dora_errors():
    kw = lora_args()
    m = np.ones(OUT, np.float32)
    with pytest.raises(ValueError, match=r"`magnitude` must have shape \[out=6\]"):
        lorafuse.dora_forward(**kw, magnitude=np.ones(OUT + 1, np.float32))
    with pytest.raises(ValueError, match=r"`weight_norm` must be finite"):
        lorafuse.dora_forward(**kw, magnitude=m, weight_norm=np.full(OUT, np.nan, np.float32))
    # m / n == 0 is not invertible: the kernel's own error comes back as ValueError.
    with pytest.raises(ValueError):
        lorafuse.dora_unmerge(kw["w0"], kw["lora_A"], kw["lora_B"], 2.0, np.zeros(OUT, np.float32), m)


def test_vera_errors():
    x, w0 = f32(T, IN), f32(OUT, IN)
    ld, lb = f32(R), f32(OUT)
    with pytest.raises(ValueError, match=r"`vera_A` is too small: needs max_in >= in = 8"):
        lorafuse.vera_forward(x, w0, f32(R, IN - 1), f32(OUT, R), ld, lb)
    with pytest.raises(ValueError, match=r"`vera_B` is too small: needs max_out >= out = 6"):
        lorafuse.vera_forward(x, w0, f32(R, IN), f32(OUT - 1, R), ld, lb)
    with pytest.raises(ValueError, match=r"`lambda_d` must have shape \[r=2\]"):
        lorafuse.vera_forward(x, w0, f32(R, IN + 4), f32(OUT + 4, R), f32(R + 1), lb)
    y = lorafuse.vera_forward(x, w0, f32(R, IN + 4), f32(OUT + 4, R), ld, lb)
    assert y.shape == (T, OUT)


def test_adalora_errors():
    kw = lora_args()
    with pytest.raises(ValueError, match=r"`lora_E` must have shape \[r=2, 1\]"):
        lorafuse.adalora_forward(**kw, lora_E=f32(R, 2), ranknum=2.0)
    with pytest.raises(ValueError, match=r"`ranknum` must be a finite float"):
        lorafuse.adalora_forward(**kw, lora_E=f32(R, 1), ranknum=float("inf"))


def test_nf4_errors():
    with pytest.raises(ValueError, match="blocksize"):
        lorafuse.nf4.quantize(f32(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="`w` must be finite"):
        lorafuse.nf4.quantize(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="at least one"):
        lorafuse.nf4.quantize(np.zeros((0, 4), np.float32))
    with pytest.raises(TypeError, match="`w`"):
        lorafuse.nf4.quantize(np.zeros(64, np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        lorafuse.nf4.quantize(f32(64, 64).T)
    with pytest.raises(OverflowError):
        lorafuse.nf4.quantize(f32(64), blocksize=-1)


def test_nf4_roundtrip_any_shape():
    w = f32(3, 5, 7)  # 105 elements: odd, a short last block, 3-D
    q = lorafuse.nf4.quantize(w, blocksize=32, double_quant=False)
    assert q.shape == (3, 5, 7) and q.packed.shape == (53, 1) and q.absmax.dtype == np.float32
    deq = q.dequantize()
    assert deq.shape == w.shape and deq.dtype == np.float32
    assert np.max(np.abs(deq - w)) <= np.max(np.abs(w)) * 0.2
    assert "Nf4Tensor(shape=(3, 5, 7)" in repr(q)


def test_zero_sized_inputs_do_not_panic():
    """Empty dims either work or raise ValueError; never a pyo3 PanicException."""
    for shape in [(0, IN), (T, 0)]:
        kw = lora_args()
        kw["x"] = np.zeros(shape, np.float32)
        if shape[1] == 0:
            kw.update(w0=np.zeros((OUT, 0), np.float32), lora_A=np.zeros((R, 0), np.float32))
        try:
            lorafuse.lora_forward(**kw)
        except (ValueError, RuntimeError):
            pass


def test_releases_gil():
    """Kernels run concurrently from threads (the GIL is released) and agree."""
    kw = dict(x=f32(64, 512), w0=f32(512, 512), lora_A=f32(8, 512), lora_B=f32(512, 8), scaling=1.0)
    ref = lorafuse.lora_forward(**kw)
    results = []

    def work():
        for _ in range(5):
            results.append(lorafuse.lora_forward(**kw))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(np.array_equal(r, ref) for r in results)


def test_frozen_weight_stands_in_for_w0():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    w0 = rng.standard_normal((7, 20)).astype(np.float32)
    a = rng.standard_normal((2, 20)).astype(np.float32)
    b = rng.standard_normal((7, 2)).astype(np.float32)
    fw = lorafuse.FrozenWeight(w0)
    assert fw.shape == (7, 20)
    np.testing.assert_array_equal(fw.numpy(), w0)
    assert lorafuse.lora_forward(x, fw, a, b, 0.5).tobytes() == lorafuse.lora_forward(x, w0, a, b, 0.5).tobytes()
    m = np.linalg.norm(w0, axis=1).astype(np.float32)
    dy = rng.standard_normal((3, 7)).astype(np.float32)
    for got, want in zip(lorafuse.dora_backward(dy, x, fw, a, b, 0.5, m), lorafuse.dora_backward(dy, x, w0, a, b, 0.5, m)):
        assert got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="w0"):
        lorafuse.lora_forward(x, lorafuse.FrozenWeight(w0[0]), a, b, 0.5)
    with pytest.raises(ValueError, match="w0"):
        lorafuse.lora_forward(x, lorafuse.FrozenWeight(w0[:, :10].copy()), a, b, 0.5)
    with pytest.raises(ValueError, match="finite"):
        bad = w0.copy()
        bad[0, 0] = np.nan
        lorafuse.FrozenWeight(bad)
