"""lorafuse.load_adapter / save_adapter against the golden PEFT adapter folders: every tensor
read equals the file's, and a save followed by a load gives back the same config and tensors
(the folder PEFT would load)."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

import lorafuse
from conftest import GOLDEN_DIR


def adapter_dirs():
    root = GOLDEN_DIR / "adapters"
    dirs = sorted(p for p in root.glob("*") if (p / "adapter_config.json").is_file()) if root.is_dir() else []
    if not dirs:
        return [pytest.param(None, marks=pytest.mark.skip(f"no adapter folders in {root}"))]
    return [pytest.param(d, id=d.name) for d in dirs]


@pytest.mark.parametrize("folder", adapter_dirs())
def test_load_equals_files_and_save_round_trips(folder, tmp_path):
    print(f"golden: {folder.name}")
    config, tensors = lorafuse.load_adapter(str(folder))
    on_disk = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == on_disk["peft_type"]
    for key in ("r", "lora_alpha", "target_modules"):
        if key in on_disk and on_disk[key] is not None:
            want = on_disk[key]
            got = config[key]
            if isinstance(want, list):
                assert sorted(got) == sorted(want), key
            else:
                assert got == want, key
    raw = load_file(str(folder / "adapter_model.safetensors"))
    assert set(tensors) == set(raw)
    for name, arr in raw.items():
        assert tensors[name].dtype == np.float32
        assert tensors[name].shape == arr.shape, name
        np.testing.assert_array_equal(tensors[name], arr.astype(np.float32), err_msg=name)

    out = tmp_path / "saved"
    lorafuse.save_adapter(str(out), config, tensors)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config2, tensors2 = lorafuse.load_adapter(str(out))
    assert config2 == config
    assert set(tensors2) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(tensors2[name], tensors[name], err_msg=name)


def lora_folder():
    folder = GOLDEN_DIR / "adapters" / "mlp_lora"
    if not (folder / "adapter_config.json").is_file():
        pytest.skip(f"no {folder}")
    return folder


def test_bad_adapter_arguments_raise_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        lorafuse.load_adapter(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter_config.json"):
        lorafuse.load_adapter(str(tmp_path / "empty"))
    config, tensors = lorafuse.load_adapter(str(lora_folder()))
    with pytest.raises(TypeError, match="config"):
        lorafuse.save_adapter(str(tmp_path / "a"), "not a dict", tensors)
    with pytest.raises(TypeError, match="tensors"):
        lorafuse.save_adapter(str(tmp_path / "a"), config, [1, 2])
    name = next(k for k in tensors if k.endswith("lora_A.weight"))
    bad = dict(tensors)
    bad[name] = tensors[name].astype(np.float64)
    with pytest.raises(TypeError, match="lora_A"):
        lorafuse.save_adapter(str(tmp_path / "a"), config, bad)
    bad[name] = np.full_like(tensors[name], math.nan)
    with pytest.raises(ValueError, match="lora_A"):
        lorafuse.save_adapter(str(tmp_path / "a"), config, bad)
    bad[name] = np.zeros((tensors[name].shape[0] + 1, tensors[name].shape[1]), np.float32)
    with pytest.raises(ValueError):
        lorafuse.save_adapter(str(tmp_path / "a"), config, bad)
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
