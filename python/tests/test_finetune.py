"""lorafuse.finetune: the CLI's trainer from Python, on the real model (LORAFUSE_MODEL)."""

import json
import os

import pytest

import lorafuse


def model_path():
    path = os.environ.get("LORAFUSE_MODEL")
    if path and os.path.isfile(path):
        return path
    reason = "LORAFUSE_MODEL is not set to the SmolLM2 GGUF"
    if "model" in os.environ.get("LORAFUSE_REQUIRE", ""):
        pytest.fail(f"LORAFUSE_REQUIRE lists model: {reason}")
    pytest.skip(reason)


def test_finetune_writes_a_peft_adapter_and_returns_metrics(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ("hi", "yes", "no", "ok")]
    lines = [json.dumps(r) for r in rows * 3] + ['{"instruction": 5}']
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    m = lorafuse.finetune(
        str(out), "lora", model_path(), str(data), steps=2, batch_size=2, r=4,
        max_len=32, bad_records="skip", progress=False,
    )
    assert len(m["steps"]) == 2
    assert all(s["loss"] > 0 for s in m["steps"])
    assert m["trainable_params"] > 0 and m["eval_loss_before"] is not None
    for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss_curve.png"):
        assert (out / f).is_file(), f
    config, tensors = lorafuse.load_adapter(str(out))
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert any(k.endswith("lora_A.weight") for k in tensors)
    assert json.loads((out / "metrics.json").read_text())["steps"] == m["steps"]
    # The same run over bf16 bases: the frozen weights move by bf16's rounding only.
    b = lorafuse.finetune(
        str(tmp_path / "bf16"), "lora", model_path(), str(data), steps=2, batch_size=2, r=4,
        max_len=32, bad_records="skip", progress=False, compute_dtype="bf16",
    )
    assert abs(b["eval_loss_before"] - m["eval_loss_before"]) < 1e-2 * m["eval_loss_before"]
    assert abs(b["steps"][0]["loss"] - m["steps"][0]["loss"]) < 1e-2 * m["steps"][0]["loss"]
    assert b["peak_rss_bytes"] > 0


def test_finetune_bad_settings_raise_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="method"):
        lorafuse.finetune(str(tmp_path / "a"), "bogus")
    with pytest.raises(ValueError, match="r"):
        lorafuse.finetune(str(tmp_path / "a"), r=0)
    with pytest.raises(ValueError, match="qkv"):
        lorafuse.finetune(str(tmp_path / "a"), target_modules=["qkv"])
    with pytest.raises(ValueError, match="bad_records"):
        lorafuse.finetune(str(tmp_path / "a"), bad_records="maybe")
    with pytest.raises(ValueError, match="full"):
        lorafuse.finetune(str(tmp_path / "a"), "lora", freeze_embeddings=True)
    with pytest.raises(ValueError, match="compute_dtype"):
        lorafuse.finetune(str(tmp_path / "a"), compute_dtype="fp8")
    with pytest.raises(ValueError, match="compute_dtype"):
        lorafuse.finetune(str(tmp_path / "a"), "full", compute_dtype="bf16")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        lorafuse.finetune(str(tmp_path / "a"), model=str(tmp_path / "missing.gguf"), steps=1)
    assert not (tmp_path / "a").exists()


def test_finetune_additive_methods_save_their_reference_library_files(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ("hi", "yes", "no", "ok")]
    data.write_text("\n".join(json.dumps(r) for r in rows * 3) + "\n")
    common = dict(steps=2, batch_size=2, max_len=32, eval=False, progress=False)
    out = tmp_path / "ia3"
    lorafuse.finetune(str(out), "ia3", model_path(), str(data), **common)
    config, tensors = lorafuse.load_adapter(str(out))
    assert config["peft_type"] == "IA3"
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    assert config["feedforward_modules"] == ["down_proj"]
    assert all(k.endswith("ia3_l") for k in tensors)
    out = tmp_path / "prompt"
    lorafuse.finetune(str(out), "prompt_tuning", model_path(), str(data), num_virtual_tokens=4,
                      prompt_tuning_init_text="Answer briefly.", **common)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    assert config["prompt_tuning_init"] == "TEXT"
    out = tmp_path / "pfeiffer"
    lorafuse.finetune(str(out), "pfeiffer", model_path(), str(data), reduction_factor=32,
                      adapter_name="chat", **common)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["name"] == "chat" and config["config"]["reduction_factor"] == 32
    assert (out / "adapter.safetensors").is_file()
    with pytest.raises(ValueError, match="fuse"):
        lorafuse.finetune(str(tmp_path / "f"), "adapter_fusion", model_path(), str(data),
                          fuse=[str(out)], **common)
    assert not (tmp_path / "f").exists()


def test_finetune_trains_conversations_with_the_chat_options(tmp_path):
    data = tmp_path / "chat.jsonl"
    conv = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And of grass?"},
        {"role": "assistant", "content": "Green."},
    ]
    data.write_text("\n".join(json.dumps({"messages": conv}) for _ in range(10)) + "\n")
    common = dict(steps=1, batch_size=2, max_len=64, progress=False)
    runs = {}
    for loss_on in ("assistant", "last", "all"):
        out = tmp_path / loss_on
        runs[loss_on] = lorafuse.finetune(str(out), "lora", model_path(), str(data),
                                          loss_on=loss_on, **common)
        assert (out / "adapter_model.safetensors").is_file()
    # The targets differ: one assistant turn < both < every token.
    n = {k: m["steps"][0]["targets"] for k, m in runs.items()}
    assert n["last"] < n["assistant"] < n["all"], n
    # Without a system turn SmolLM2's template adds its default one; the default recipe's fixed
    # ChatML adds none: fewer tokens, the same assistant targets.
    data.write_text("\n".join(json.dumps({"messages": conv[1:]}) for _ in range(10)) + "\n")
    own = lorafuse.finetune(str(tmp_path / "own"), "lora", model_path(), str(data), **common)
    chatml = lorafuse.finetune(str(tmp_path / "chatml"), "lora", model_path(), str(data),
                               chat_template="chatml", **common)
    assert chatml["steps"][0]["targets"] == own["steps"][0]["targets"]
    assert chatml["steps"][0]["tokens"] < own["steps"][0]["tokens"]
    with pytest.raises(ValueError, match="loss_on"):
        lorafuse.finetune(str(tmp_path / "x"), loss_on="first")
    with pytest.raises(ValueError, match="truncation"):
        lorafuse.finetune(str(tmp_path / "x"), truncation="middle")
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        lorafuse.finetune(str(tmp_path / "x"), "lora", model_path(), str(data),
                          chat_template=str(tmp_path / "missing.jinja"), **common)
    assert not (tmp_path / "x").exists()
