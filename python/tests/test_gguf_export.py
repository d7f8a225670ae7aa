"""`lorafuse export --to gguf-lora` and `lorafuse merge --to gguf` read back with the `gguf`
package (llama.cpp's gguf-py), on the real model (LORAFUSE_MODEL): llama.cpp's metadata keys,
tensor names and shapes, lora_A as it is and lora_B with llama.cpp's q/k row permutation (its
converter's formula, written here in numpy), and Q8_0 bytes equal to gguf-py's own quantizer."""

import json
import math
import os
import pathlib
import subprocess

import numpy as np
import pytest
from safetensors.numpy import save_file

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is not installed")

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("LORAFUSE_BIN", str(REPO / "target" / "release" / "lorafuse")))
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_PROJ = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def _need(what, ok):
    if ok:
        return
    reason = f"LORAFUSE_MODEL is not set to the SmolLM2 GGUF or {what} is missing"
    if "model" in os.environ.get("LORAFUSE_REQUIRE", ""):
        pytest.fail(f"LORAFUSE_REQUIRE lists model: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def model():
    path = os.environ.get("LORAFUSE_MODEL")
    _need("the model file", path and os.path.isfile(path))
    _need(f"the lorafuse binary ({BIN}; cargo build --release)", BIN.is_file())
    return pathlib.Path(path)


def _run(*args):
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _hparams(r):
    f = lambda k: int(r.fields[k].contents())  # noqa: E731
    return dict(
        layers=f("llama.block_count"),
        d=f("llama.embedding_length"),
        ff=f("llama.feed_forward_length"),
        heads=f("llama.attention.head_count"),
        kv=f("llama.attention.head_count_kv"),
    )


def _permute(w, n_head):
    """llama.cpp's converter: rows of each head from transformers' order to its RoPE order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _adapter(tmp, model, r=4, alpha=8.0, seed=3):
    h = _hparams(gguf.GGUFReader(str(model)))
    hd = h["d"] // h["heads"]
    shapes = {"q_proj": (h["heads"] * hd, h["d"]), "k_proj": (h["kv"] * hd, h["d"]), "v_proj": (h["kv"] * hd, h["d"]),
              "o_proj": (h["d"], h["heads"] * hd), "gate_proj": (h["ff"], h["d"]), "up_proj": (h["ff"], h["d"]),
              "down_proj": (h["d"], h["ff"])}
    rng = np.random.default_rng(seed)
    t = {}
    for l in range(h["layers"]):
        for p in PROJ:
            out, inp = shapes[p]
            g = "self_attn" if p in PROJ[:4] else "mlp"
            k = f"base_model.model.model.layers.{l}.{g}.{p}"
            t[f"{k}.lora_A.weight"] = rng.uniform(-1, 1, (r, inp)).astype(np.float32) / math.sqrt(inp)
            t[f"{k}.lora_B.weight"] = rng.standard_normal((out, r)).astype(np.float32) * 0.02
    d = tmp / "adapter"
    d.mkdir()
    save_file(t, str(d / "adapter_model.safetensors"))
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=PROJ)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d, t, h


def test_lora_adapter_gguf_reads_back_with_llama_cpps_layout(model, tmp_path):
    ad, t, h = _adapter(tmp_path, model)
    out = tmp_path / "a.gguf"
    _run("export", "--model", model, "--adapter", ad, "--to", "gguf-lora", "--out", out)
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["adapter.type"].contents() == "lora"
    assert float(r.fields["adapter.lora.alpha"].contents()) == 8.0  # one rank: alpha as in PEFT
    tensors = {x.name: x for x in r.tensors}
    assert len(tensors) == 2 * 7 * h["layers"]
    for l in (0, h["layers"] - 1):
        for p, g in zip(PROJ, GGUF_PROJ):
            grp = "self_attn" if p in PROJ[:4] else "mlp"
            k = f"base_model.model.model.layers.{l}.{grp}.{p}"
            a, b = t[f"{k}.lora_A.weight"], t[f"{k}.lora_B.weight"]
            ta, tb = tensors[f"blk.{l}.{g}.weight.lora_a"], tensors[f"blk.{l}.{g}.weight.lora_b"]
            # gguf-py lists ne (fastest first): lora_a [in, r], lora_b [r, out]
            assert list(ta.shape) == [a.shape[1], a.shape[0]]
            assert list(tb.shape) == [b.shape[1], b.shape[0]]
            np.testing.assert_array_equal(np.asarray(ta.data).reshape(a.shape), a)
            want = _permute(b, h["heads"]) if p == "q_proj" else _permute(b, h["kv"]) if p == "k_proj" else b
            np.testing.assert_array_equal(np.asarray(tb.data).reshape(b.shape), want)


def test_merged_gguf_keeps_metadata_and_q8_0_matches_gguf_py(model, tmp_path):
    ad, t, h = _adapter(tmp_path, model, seed=5)
    f32, q8 = tmp_path / "m32.gguf", tmp_path / "m8.gguf"
    _run("merge", "--model", model, "--adapter", ad, "--to", "gguf", "--dtype", "f32", "--out", f32)
    _run("merge", "--model", model, "--adapter", ad, "--to", "gguf", "--dtype", "q8_0", "--out", q8)
    src, m32, m8 = (gguf.GGUFReader(str(p)) for p in (model, f32, q8))
    for key in ["tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.rope.freq_base", "general.architecture"]:
        assert m8.fields[key].contents() == src.fields[key].contents(), key
    assert int(m32.fields["general.file_type"].contents()) == 0
    assert int(m8.fields["general.file_type"].contents()) == 7
    T = gguf.GGMLQuantizationType
    a32 = {x.name: x for x in m32.tensors}
    a8 = {x.name: x for x in m8.tensors}
    assert sorted(a8) == sorted(x.name for x in src.tensors)
    for name in ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight", "blk.5.attn_norm.weight"]:
        x32, x8 = a32[name], a8[name]
        assert x32.tensor_type == T.F32
        if len(x32.shape) == 1 or x32.shape[1] == 1:
            assert x8.tensor_type == T.F32  # norms stay F32, as llama.cpp keeps them
            continue
        assert x8.tensor_type == T.Q8_0
        w = np.asarray(x32.data, dtype=np.float32).reshape(int(x32.shape[1]), int(x32.shape[0]))
        ref = gguf.quants.quantize(w, T.Q8_0)
        np.testing.assert_array_equal(np.asarray(x8.data).reshape(-1).view(np.uint8), ref.reshape(-1).view(np.uint8))
    # the merged q rows are W0 + s B A in llama.cpp's order: check one row block against the source
    w0 = gguf.quants.dequantize(next(x for x in src.tensors if x.name == "blk.0.attn_q.weight").data, T.Q4_1)
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    want = w0.reshape(b.shape[0], a.shape[1]) + _permute(2.0 * (b @ a), h["heads"])
    got = np.asarray(a32["blk.0.attn_q.weight"].data).reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_refusals_name_the_way_out(model, tmp_path):
    ad, _, _ = _adapter(tmp_path, model)
    p = subprocess.run([str(BIN), "merge", "--model", str(model), "--adapter", str(ad), "--to", "gguf",
                        "--requantize-nf4", "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert p.returncode != 0 and "requantize-nf4" in p.stderr
    p = subprocess.run([str(BIN), "merge", "--model", str(model), "--adapter", str(ad), "--dtype", "q8_0",
                        "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert p.returncode != 0 and "--to gguf" in p.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.safetensors").exists()
