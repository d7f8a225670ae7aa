"""Many adapters in one batch (`lora_forward_multi`, `LoraPool`): every row equals the numpy
composition of the base product and its own adapter's term (LoRA, VeRA, AdaLoRA, ragged ranks
1, 7 and 64), rows of -1 get the base alone, over a dense, FrozenWeight or NF4 base, with and
without bias; bad arguments raise TypeError/ValueError naming the argument."""

import numpy as np
import pytest

import lorafuse

T, IN, OUT = 11, 24, 18
MAX_IN, MAX_OUT = 32, 20
ATOL = 1e-4
rng = np.random.default_rng(1234)


def f32(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def lora(r, s=0.75):
    return {"lora_A": f32(r, IN, scale=0.3), "lora_B": f32(OUT, r, scale=0.3), "scaling": s}


def vera(r):
    return {
        "vera_A": f32(r, MAX_IN, scale=0.3), "vera_B": f32(MAX_OUT, r, scale=0.3),
        "lambda_d": f32(r), "lambda_b": f32(OUT),
    }


def adalora(r, ranknum=None):
    e = f32(r, 1)
    e[::3] = 0.0  # masked ranks
    return {
        "lora_A": f32(r, IN, scale=0.3), "lora_B": f32(OUT, r, scale=0.3), "lora_E": e,
        "scaling": 4.0, "ranknum": float(r if ranknum is None else ranknum),
    }


def term_ref(t, x):
    """The adapter's term for rows x [n, IN], in float64, as PEFT computes it."""
    x = x.astype(np.float64)
    if t is None:
        return np.zeros((x.shape[0], OUT))
    if "vera_A" in t:
        a, b = t["vera_A"][:, :IN].astype(np.float64), t["vera_B"][:OUT].astype(np.float64)
        return t["lambda_b"] * ((t["lambda_d"] * (x @ a.T)) @ b.T)
    if "lora_E" in t:
        ae = (t["lora_A"] * t["lora_E"]).astype(np.float64)
        return (x @ ae.T) @ t["lora_B"].T.astype(np.float64) * t["scaling"] / (t["ranknum"] + 1e-5)
    return t["scaling"] * (x @ t["lora_A"].T.astype(np.float64)) @ t["lora_B"].T.astype(np.float64)


def reference(x, w, adapters, rows, bias=None):
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    if bias is not None:
        y = y + bias
    for t_, i in enumerate(rows):
        if i >= 0:
            y[t_] += term_ref(adapters[i], x[t_ : t_ + 1])[0]
    return y


def check(y, ref):
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=ATOL, rtol=1e-4)


# ragged ranks and methods; adapter 3 leaves the projection alone
ADAPTERS = [lora(1), lora(7, s=2.0), vera(64), None, adalora(7), lora(64, s=0.125), adalora(1)]
K = len(ADAPTERS)
ROWS = {
    # one row per sequence in a decode batch (BGMV), every adapter and the base mixed
    "interleaved": [0, 2, -1, 4, 1, 3, 5, 6, 0, -1, 2],
    # one run per sequence in a prefill (SGMV)
    "segmented": [1, 1, 1, 2, 2, -1, -1, 5, 5, 5, 4],
    "all_base": [-1] * T,
    "one_adapter": [2] * T,
}


@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_per_row_composition(rows, with_bias):
    x, w = f32(T, IN), f32(OUT, IN)
    bias = f32(OUT) if with_bias else None
    ref = reference(x, w, ADAPTERS, rows, bias)
    check(lorafuse.lora_forward_multi(x, w, ADAPTERS, np.array(rows), bias=bias), ref)
    # a list works as the indices too, and a FrozenWeight as the base
    check(lorafuse.lora_forward_multi(x, lorafuse.FrozenWeight(w), ADAPTERS, rows, bias), ref)
    pool = lorafuse.LoraPool(ADAPTERS, IN, OUT)
    check(pool.forward(x, w, np.array(rows, dtype=np.int32), bias), ref)


def test_row_equals_the_single_adapter_ops():
    x, w, b = f32(T, IN), f32(OUT, IN), f32(OUT)
    rows = np.array([0, 1, 2, 4, -1, 5, 6, 3, 0, 1, 2])
    y = lorafuse.lora_forward_multi(x, w, ADAPTERS, rows, bias=b)
    for t_, i in enumerate(rows):
        xt = x[t_ : t_ + 1]
        a = ADAPTERS[i] if i >= 0 else None
        if a is None:
            single = xt @ w.T + b
        elif "vera_A" in a:
            single = lorafuse.vera_forward(xt, w, a["vera_A"], a["vera_B"], a["lambda_d"], a["lambda_b"], b)
        elif "lora_E" in a:
            single = lorafuse.adalora_forward(
                xt, w, a["lora_A"], a["lora_B"], a["lora_E"], a["scaling"], a["ranknum"], b
            )
        else:
            single = lorafuse.lora_forward(xt, w, a["lora_A"], a["lora_B"], a["scaling"], b)
        np.testing.assert_allclose(y[t_ : t_ + 1], single, atol=ATOL, rtol=1e-4, err_msg=f"row {t_}")


def test_nf4_base():
    x, w, b = f32(T, IN), f32(OUT, IN), f32(OUT)
    q = lorafuse.nf4.quantize(w, blocksize=64)
    wq = q.dequantize()
    rows = ROWS["interleaved"]
    ref = reference(x, wq, ADAPTERS, rows, b)
    check(lorafuse.lora_forward_multi(x, q, ADAPTERS, rows, b), ref)
    check(lorafuse.LoraPool(ADAPTERS, IN, OUT).forward(x, q, rows, b), ref)
    # the mixed batch over NF4 agrees with the single-adapter QLoRA op row by row
    a = ADAPTERS[1]
    single = lorafuse.lora_forward(x, q, a["lora_A"], a["lora_B"], a["scaling"], b)
    y = lorafuse.lora_forward_multi(x, q, ADAPTERS, [1] * T, b)
    np.testing.assert_allclose(y, single, atol=ATOL, rtol=1e-4)


def test_pool_is_reusable_and_reports_its_layout():
    pool = lorafuse.LoraPool(ADAPTERS, in_features=IN, out_features=OUT)
    assert len(pool) == K
    assert pool.ranks == [1, 7, 64, 0, 7, 64, 1]
    assert pool.methods == ["lora", "lora", "vera", None, "adalora", "lora", "adalora"]
    assert (pool.in_features, pool.out_features) == (IN, OUT)
    assert "LoraPool" in repr(pool)
    w = f32(OUT, IN)
    for n in (1, 5, T):
        x = f32(n, IN)
        rows = rng.integers(-1, K, size=n)
        check(pool.forward(x, w, rows), reference(x, w, ADAPTERS, rows))


def test_index_arrays_of_any_int_dtype_and_strides():
    x, w = f32(T, IN), f32(OUT, IN)
    rows = np.array(ROWS["interleaved"])
    ref = reference(x, w, ADAPTERS, rows)
    pool = lorafuse.LoraPool(ADAPTERS, IN, OUT)
    strided = np.repeat(rows, 2)[::2]
    assert not strided.flags.c_contiguous
    for idx in (rows.astype(np.int8), rows.astype(np.int32), strided, tuple(int(i) for i in rows)):
        check(pool.forward(x, w, idx), ref)


def test_pool_copies_the_adapters():
    a = lora(3)
    pool = lorafuse.LoraPool([a], IN, OUT)
    x, w = f32(4, IN), f32(OUT, IN)
    before = pool.forward(x, w, [0] * 4)
    a["lora_B"][:] = 0.0  # the pool holds its own (folded) copy
    np.testing.assert_array_equal(pool.forward(x, w, [0] * 4), before)


def test_empty_pool_and_no_rows():
    x, w, b = f32(3, IN), f32(OUT, IN), f32(OUT)
    check(lorafuse.lora_forward_multi(x, w, [], [-1, -1, -1], b), reference(x, w, [], [-1] * 3, b))
    check(lorafuse.lora_forward_multi(x, w, [None, None], [1, 0, -1]), reference(x, w, [None] * 2, [-1] * 3))
    y = lorafuse.lora_forward_multi(np.zeros((0, IN), np.float32), w, ADAPTERS, [])
    assert y.shape == (0, OUT) and y.dtype == np.float32


def test_adapter_terms_of_other_arrays_are_checked():
    """Tuples of adapters work; FrozenWeights work as adapter arrays."""
    x, w = f32(T, IN), f32(OUT, IN)
    a = lora(5)
    fa = dict(a, lora_A=lorafuse.FrozenWeight(a["lora_A"]))
    rows = [0] * T
    check(lorafuse.lora_forward_multi(x, w, (fa,), rows), reference(x, w, [a], rows))


# ---- errors ----------------------------------------------------------------------------------


def args(**kw):
    base = dict(x=f32(T, IN), w0=f32(OUT, IN), adapters=ADAPTERS, adapter_of_row=ROWS["interleaved"])
    base.update(kw)
    return base


def raises(exc, words, fn=lorafuse.lora_forward_multi, **kw):
    with pytest.raises(exc) as e:
        fn(**args(**kw))
    msg = str(e.value)
    print(f"{exc.__name__}: {msg}")
    for w in words:
        assert w in msg, (w, msg)


def with_entry(i, term):
    a = list(ADAPTERS)
    a[i] = term
    return a


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(adapter_of_row=[0] * (T - 1)), ValueError, ["`adapter_of_row`", f"{T}", f"{T - 1}"]),
        (dict(adapter_of_row=[0] * (T - 1) + [K]), ValueError, ["`adapter_of_row`[10]", f"{K}", "-1.."]),
        (dict(adapter_of_row=[-2] + [0] * (T - 1)), ValueError, ["`adapter_of_row`[0]", "-2"]),
        (dict(adapter_of_row=[2**40] * T), ValueError, ["`adapter_of_row`[0]"]),
        (dict(adapter_of_row=np.zeros(T, np.float32)), TypeError, ["`adapter_of_row`", "integers"]),
        (dict(adapter_of_row=np.zeros((T, 1), np.int64)), ValueError, ["`adapter_of_row`", "1-D"]),
        (dict(adapter_of_row="0" * T), TypeError, ["`adapter_of_row`"]),
        (dict(adapter_of_row=[0.5] * T), TypeError, ["`adapter_of_row`"]),
        (dict(adapters={"a": lora(2)}), TypeError, ["`adapters`", "list"]),
        (dict(adapters=with_entry(1, (f32(2, IN), f32(OUT, 2), 1.0))), TypeError, ["`adapters[1]`", "dict"]),
        (dict(adapters=with_entry(1, dict(lora(2), lora_A=f32(2, IN + 1)))), ValueError,
         ["`adapters[1].lora_A`", "[r, in=24]", "(2, 25)"]),
        (dict(adapters=with_entry(0, dict(lora(2), lora_B=f32(OUT, 3)))), ValueError,
         ["`adapters[0].lora_B`", "[out=18, r=2]"]),
        (dict(adapters=with_entry(2, dict(vera(4), vera_A=f32(4, IN - 1)))), ValueError,
         ["`adapters[2].vera_A`", "too small"]),
        (dict(adapters=with_entry(2, dict(vera(4), lambda_b=f32(OUT + 1)))), ValueError,
         ["`adapters[2].lambda_b`", "[out=18]"]),
        (dict(adapters=with_entry(4, dict(adalora(3), lora_E=f32(3)))), ValueError,
         ["`adapters[4].lora_E`", "2-D"]),
        (dict(adapters=with_entry(4, dict(adalora(3), ranknum=0.0))), ValueError,
         ["`adapters[4].ranknum`", "positive"]),
        (dict(adapters=with_entry(1, {"lora_A": f32(2, IN), "lora_B": f32(OUT, 2)})), ValueError,
         ["`adapters[1]`", "'scaling'", "LoRA"]),
        (dict(adapters=with_entry(1, dict(lora(2), lora_b=f32(OUT, 2)))), ValueError,
         ["`adapters[1]`", "unknown key", "'lora_b'"]),
        (dict(adapters=with_entry(1, dict(lora(2), scaling="x"))), TypeError, ["`adapters[1].scaling`", "float"]),
        (dict(adapters=with_entry(1, dict(lora(2), scaling=float("inf")))), ValueError,
         ["`adapters[1].scaling`", "finite"]),
        (dict(adapters=with_entry(1, dict(lora(2), lora_A=np.ones((2, IN))))), TypeError,
         ["`adapters[1].lora_A`", "float32"]),
        (dict(adapters=with_entry(1, lora(0))), ValueError, ["`adapters[1].lora_A`", "rank 0", "None"]),
        (dict(adapters=with_entry(1, dict(lora(2), magnitude=f32(OUT)))), ValueError,
         ["`adapters[1]`", "DoRA", "mixed batch"]),
        (dict(x=f32(T, IN + 1)), ValueError, ["`w0`", "[out, in=25]"]),
        (dict(x=f32(T, IN, 1)), ValueError, ["`x`", "2-D"]),
        (dict(bias=f32(OUT + 1)), ValueError, ["`bias`", "[out=18]"]),
        (dict(w0=np.ones((OUT, IN), np.float64)), TypeError, ["`w0`", "float32"]),
    ],
)
def test_function_bad_argument(kw, exc, words):
    raises(exc, words, **kw)


def test_pool_bad_arguments():
    with pytest.raises(ValueError, match="`in_features`"):
        lorafuse.LoraPool(ADAPTERS, 0, OUT)
    with pytest.raises(TypeError, match="`out_features`"):
        lorafuse.LoraPool(ADAPTERS, IN, "18")
    with pytest.raises(ValueError, match=r"`adapters\[0\].lora_A`"):
        lorafuse.LoraPool(ADAPTERS, IN + 1, OUT)
    with pytest.raises(ValueError, match=r"`adapters\[1\]`.*DoRA"):
        lorafuse.LoraPool([None, dict(lora(2), magnitude=f32(OUT))], IN, OUT)
    pool = lorafuse.LoraPool(ADAPTERS, IN, OUT)
    x, w = f32(T, IN), f32(OUT, IN)
    with pytest.raises(ValueError, match="`w0`.*pool"):
        pool.forward(f32(T, IN + 1), f32(OUT, IN + 1), [0] * T)
    with pytest.raises(ValueError, match="`w0`.*pool"):
        pool.forward(x, f32(OUT + 1, IN), [0] * T)
    with pytest.raises(ValueError, match=r"`adapter_of_row`\[3\] = 7"):
        pool.forward(x, w, [0, 0, 0, K] + [0] * (T - 4))
    with pytest.raises(ValueError, match="`adapter_of_row`"):
        pool.forward(x, w, [0] * (T + 1))
    with pytest.raises(ValueError, match="`bias`"):
        pool.forward(x, w, [0] * T, f32(3))
    with pytest.raises(ValueError, match="`x`"):
        pool.forward(f32(T, IN, 2), w, [0] * T)
