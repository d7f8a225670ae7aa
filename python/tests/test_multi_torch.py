"""lorafuse.torch's mixed-adapter batches against real PEFT on CPU torch: ``MultiLoraLinear``
over every adapter of a PEFT layer gives PEFT's ``model(x, adapter_names=[...])`` (atol 1e-5)
for LoRA adapters of ranks 1, 7 and 64 (one rsLoRA), and a batch that mixes LoRA, VeRA and
AdaLoRA terms gives, sample by sample, each PEFT model's own output.

Needs torch and peft (see scripts/test-python-torch.sh); skipped with the reason otherwise, a
failure when LORAFUSE_REQUIRE contains `torch`.
"""

import os

import numpy as np
import pytest

try:
    import peft
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - depends on the environment
    msg = f"torch/peft not importable ({e}); run `bash scripts/test-python-torch.sh`"
    if "torch" in os.environ.get("LORAFUSE_REQUIRE", ""):
        raise ImportError(f"LORAFUSE_REQUIRE=torch: {msg}") from e
    pytest.skip(msg, allow_module_level=True)

import lorafuse
import lorafuse.torch as lt

IN, HID, OUT = 13, 22, 9
ATOL = 1e-5
NAMES = ["__base__", "r7", "r1", "r64", "r7", "r1"]


def mlp(seed=4321):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))


def randomize(model, seed):
    """Every adapter tensor random and non-zero (lora_B starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "vera_lambda")):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def lora_model():
    """Three LoRA adapters of ranks 1, 7 and 64 (the last rsLoRA) on both linears."""
    targets = ["0", "2"]
    model = peft.get_peft_model(
        mlp(), peft.LoraConfig(r=1, lora_alpha=3, target_modules=targets), adapter_name="r1"
    )
    model.add_adapter("r7", peft.LoraConfig(r=7, lora_alpha=5, target_modules=targets))
    model.add_adapter("r64", peft.LoraConfig(r=64, lora_alpha=16, use_rslora=True, target_modules=targets))
    return randomize(model, 99).eval()


def inputs(batch=len(NAMES), seq=4, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, IN, generator=g)


def close(a, b, name):
    err = float((a.detach() - b.detach()).abs().max())
    print(f"  {name}: max abs err {err:.3g}")
    torch.testing.assert_close(a.detach(), b.detach(), atol=ATOL, rtol=1e-5, msg=name)


def test_matches_peft_adapter_names_through_the_model():
    model = lora_model()
    x = inputs()
    with torch.no_grad():
        ref = model(x, adapter_names=NAMES)
        seq = model.base_model.model
        l0, l2 = lt.MultiLoraLinear.from_peft(seq[0]), lt.MultiLoraLinear.from_peft(seq[2])
        ours = l2(torch.tanh(l0(x, adapter_names=NAMES)), adapter_names=NAMES)
    assert sorted(l0.names) == ["r1", "r64", "r7"]
    assert sorted(l0.pool().ranks) == [1, 7, 64]
    close(ours, ref, "model(x, adapter_names)")
    # per layer too, and through the function with the layer's tensors
    with torch.no_grad():
        layer = seq[0]
        ref0 = layer(x, adapter_names=NAMES)
        close(l0(x, adapter_names=NAMES), ref0, "layer")
        terms = {
            n: dict(lora_A=layer.lora_A[n].weight, lora_B=layer.lora_B[n].weight, scaling=layer.scaling[n])
            for n in layer.lora_A
        }
        base = layer.get_base_layer()
        close(lt.lora_forward_multi(x, base.weight, terms, NAMES, base.bias), ref0, "lora_forward_multi")
        # indices into a prebuilt pool work as well
        pool = l0.pool()
        idx = [-1 if n == "__base__" else l0.names.index(n) for n in NAMES]
        close(lt.lora_forward_multi(x, base.weight, pool, idx, base.bias), ref0, "pool")


def test_default_is_the_active_adapter_and_2d_rows():
    model = lora_model()
    model.set_adapter("r7")
    layer = model.base_model.model[0]
    m = lt.MultiLoraLinear.from_peft(layer)
    assert m.active_adapter == "r7"
    x = inputs()[:, 0]  # [batch, in]: one row per sample
    with torch.no_grad():
        close(m(x), layer(x), "active adapter")
        close(m(x, adapter_names=NAMES), layer(x, adapter_names=NAMES), "2-D rows")
        # a name that is not on this layer is the base layer (PEFT skips it per layer)
        close(m(x, adapter_names=["nope"] * len(NAMES)), layer.get_base_layer()(x), "unknown name")


def test_pool_follows_in_place_updates():
    model = lora_model()
    layer = model.base_model.model[2]
    m = lt.MultiLoraLinear.from_peft(layer)
    x = torch.randn(len(NAMES), 2, HID, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = m.pool()
        close(m(x, adapter_names=NAMES), layer(x, adapter_names=NAMES), "before")
        assert m.pool() is first
        layer.lora_B["r7"].weight.mul_(-3.0)
        close(m(x, adapter_names=NAMES), layer(x, adapter_names=NAMES), "after update")
        assert m.pool() is not first


def single(method, seed):
    """A one-adapter PEFT model of `method` on the same base MLP (seed 4321)."""
    targets = ["0", "2"]
    if method == "vera":
        cfg = peft.VeraConfig(r=6, target_modules=targets, d_initial=0.3)
    elif method == "adalora":
        cfg = peft.AdaLoraConfig(init_r=5, target_r=3, total_step=100, target_modules=targets, lora_alpha=5)
    else:
        cfg = peft.LoraConfig(r=3, lora_alpha=7, target_modules=targets)
    model = randomize(peft.get_peft_model(mlp(), cfg), seed).eval()
    if method == "adalora":
        with torch.no_grad():  # a masked rank, as the rank allocator leaves it
            model.base_model.model[0].lora_E["default"][1] = 0.0
    return model


def term_of(layer, method):
    n = "default"
    if method == "vera":
        return dict(vera_A=layer.vera_A[n], vera_B=layer.vera_B[n], lambda_d=layer.vera_lambda_d[n],
                    lambda_b=layer.vera_lambda_b[n])
    if method == "adalora":
        return dict(lora_A=layer.lora_A[n], lora_B=layer.lora_B[n], lora_E=layer.lora_E[n],
                    scaling=layer.scaling[n], ranknum=layer.ranknum[n])
    return dict(lora_A=layer.lora_A[n].weight, lora_B=layer.lora_B[n].weight, scaling=layer.scaling[n])


def test_lora_vera_adalora_mixed_in_one_batch():
    methods = ["lora", "vera", "adalora"]
    models = {m: single(m, 10 + i) for i, m in enumerate(methods)}
    layers = {m: models[m].base_model.model[0] for m in methods}
    base = layers["lora"].get_base_layer()
    adapters = {m: term_of(layers[m], m) for m in methods}
    adapters["none"] = None
    mixed = lt.MultiLoraLinear(base, adapters)
    assert mixed.pool().methods == ["lora", "vera", "adalora", None]
    names = ["vera", "lora", "__base__", "adalora", "none", "vera", "adalora"]
    x = inputs(batch=len(names))
    with torch.no_grad():
        y = mixed(x, adapter_names=names)
        for b, n in enumerate(names):
            ref = base(x[b]) if n in ("__base__", "none") else layers[n](x[b])
            close(y[b], ref, f"sample {b} ({n})")


def test_nf4_base():
    model = lora_model()
    layer = model.base_model.model[0]
    lin = layer.get_base_layer()
    q = lorafuse.nf4.quantize(lin.weight.detach().numpy(), blocksize=64)
    deq = nn.Linear(IN, HID)
    with torch.no_grad():
        deq.weight.copy_(torch.from_numpy(q.dequantize()))
        deq.bias.copy_(lin.bias)
    m_q = lt.MultiLoraLinear(lt.Nf4Linear(q, lin.bias), lt.MultiLoraLinear.from_peft(layer).adapters)
    m_d = lt.MultiLoraLinear(deq, lt.MultiLoraLinear.from_peft(layer).adapters)
    x = inputs()
    with torch.no_grad():
        close(m_q(x, adapter_names=NAMES), m_d(x, adapter_names=NAMES), "nf4 vs its dequantized weight")
        close(lt.lora_forward_multi(x, q, m_d.adapters, NAMES, lin.bias), m_d(x, adapter_names=NAMES), "fn")


def test_errors():
    model = lora_model()
    layer = model.base_model.model[0]
    base = layer.get_base_layer()
    m = lt.MultiLoraLinear.from_peft(layer)
    terms = m.adapters
    x = inputs()
    with pytest.raises(ValueError, match=r"`adapter_names\[1\]` = 'nope'"):
        lt.lora_forward_multi(x, base.weight, terms, ["r1", "nope"] + ["r1"] * (len(NAMES) - 2))
    with pytest.raises(ValueError, match="`adapter_names`.*x.shape\\[0\\] = 6"):
        lt.lora_forward_multi(x, base.weight, terms, ["r1"])
    with pytest.raises(ValueError, match=r"`adapter_names\[0\]` = 3"):
        lt.lora_forward_multi(x, base.weight, terms, [3] * len(NAMES))
    with pytest.raises(TypeError, match="`adapter_names`"):
        lt.lora_forward_multi(x, base.weight, terms, "r1")
    with pytest.raises(TypeError, match="`x`.*float32"):
        lt.lora_forward_multi(x.double(), base.weight, terms, NAMES)
    with pytest.raises(ValueError, match="`x`"):
        m(x[..., :-1], adapter_names=NAMES)
    bad = dict(terms, r7=dict(terms["r7"], lora_B=terms["r7"]["lora_B"][:-1]))
    with pytest.raises(ValueError, match=r"`adapters\[1\].lora_B`"):
        lt.lora_forward_multi(x, base.weight, bad, NAMES)
    dora = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        lt.MultiLoraLinear.from_peft(dora.base_model.model[0])
    with pytest.raises(ValueError, match="DoRA"):
        lt.lora_forward_multi(x, base.weight, [dict(terms["r1"], magnitude=torch.ones(HID))], [0] * len(NAMES))
    with pytest.raises(TypeError, match="`layer`"):
        lt.MultiLoraLinear.from_peft(base)
