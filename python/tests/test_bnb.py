"""bitsandbytes 4-bit checkpoint tensors in and out of lorafuse.nf4.Nf4Tensor: the keys,
dtypes and shapes transformers stores for a bnb Linear4bit weight, and an exact round trip."""

import json

import numpy as np
import pytest

import lorafuse
from lorafuse import nf4

KEY = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((48, 64), 64), ((33, 70), 128), ((7, 9), 32)])
def test_to_bnb_layout_and_round_trip(shape, blocksize, double_quant):
    rng = np.random.default_rng(sum(shape) + blocksize)
    w = rng.standard_normal(shape).astype(np.float32)
    q = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
    t = q.to_bnb(KEY)
    n = w.size
    blocks = -(-n // blocksize)
    assert t[KEY].dtype == np.uint8 and t[KEY].shape == ((n + 1) // 2, 1)
    np.testing.assert_array_equal(t[KEY], q.packed)
    assert t[KEY + ".quant_map"].dtype == np.float32 and t[KEY + ".quant_map"].shape == (16,)
    state = json.loads(bytes(t[KEY + ".quant_state.bitsandbytes__nf4"]).decode())
    assert state["quant_type"] == "nf4" and state["blocksize"] == blocksize
    assert list(state["shape"]) == list(shape)
    if double_quant:
        assert t[KEY + ".absmax"].dtype == np.uint8 and t[KEY + ".absmax"].shape == (blocks,)
        assert t[KEY + ".nested_quant_map"].shape == (256,)
        assert t[KEY + ".nested_absmax"].dtype == np.float32
        assert "nested_offset" in state
    else:
        assert t[KEY + ".absmax"].dtype == np.float32
        assert KEY + ".nested_absmax" not in t
    # other keys in the dict are ignored; the weight comes back bit for bit
    t["unrelated.weight"] = np.zeros(3, np.float32)
    back = nf4.Nf4Tensor.from_bnb(t, KEY)
    np.testing.assert_array_equal(back.packed, q.packed)
    np.testing.assert_array_equal(back.absmax_f32(), q.absmax_f32())
    assert back.dequantize().tobytes() == q.dequantize().tobytes()
    assert back.shape == q.shape and back.blocksize == q.blocksize


def test_quantize_rejects_zero_torch_threads():
    with pytest.raises(ValueError, match="torch_threads"):
        nf4.quantize(np.ones((4, 64), np.float32), torch_threads=0)
    # Any positive count is taken; below 32768 blocks it changes nothing.
    w = np.random.default_rng(3).standard_normal((33, 70)).astype(np.float32)
    one, many = nf4.quantize(w, torch_threads=1), nf4.quantize(w, torch_threads=7)
    assert one.dequantize().tobytes() == many.dequantize().tobytes()


def test_from_bnb_bad_input_raises_named_errors():
    q = nf4.quantize(np.ones((4, 64), np.float32))
    t = q.to_bnb(KEY)
    with pytest.raises(TypeError, match="tensors"):
        nf4.Nf4Tensor.from_bnb([1], KEY)
    missing = {k: v for k, v in t.items() if not k.endswith(".absmax")}
    with pytest.raises(ValueError, match="absmax"):
        nf4.Nf4Tensor.from_bnb(missing, KEY)
    wrong = dict(t)
    wrong[KEY + ".quant_map"] = wrong[KEY + ".quant_map"].astype(np.float64)
    with pytest.raises(TypeError, match="quant_map"):
        nf4.Nf4Tensor.from_bnb(wrong, KEY)
    short = dict(t)
    short[KEY] = short[KEY][:-1]
    with pytest.raises(ValueError):
        nf4.Nf4Tensor.from_bnb(short, KEY)
    assert lorafuse is not None
