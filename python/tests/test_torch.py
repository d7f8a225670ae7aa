"""lorafuse.torch against real PEFT on CPU torch: the swapped layers give PEFT's outputs and
gradients (atol 1e-5) for LoRA, rsLoRA, DoRA, VeRA and AdaLoRA on a tiny MLP, a few AdamW steps
follow PEFT's loss trajectory, and the swap keeps every Parameter object.

Needs torch and peft (see scripts/test-python-torch.sh); skipped with the reason otherwise, a
failure when LORAFUSE_REQUIRE contains `torch`. Shapes and seeds are this file's own.
"""

import copy
import os
import warnings

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
METHODS = ["lora", "rslora", "dora", "vera", "adalora"]


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))


def config(method, dropout=0.0):
    targets = ["0", "2"]
    if method in ("lora", "rslora", "dora"):
        return peft.LoraConfig(
            r=5, lora_alpha=7, target_modules=targets, lora_dropout=dropout,
            use_rslora=method == "rslora", use_dora=method == "dora",
        )
    if method == "vera":
        return peft.VeraConfig(r=6, target_modules=targets, vera_dropout=dropout, d_initial=0.3)
    return peft.AdaLoraConfig(
        init_r=6, target_r=3, total_step=100, target_modules=targets, lora_alpha=5,
        lora_dropout=dropout,
    )


def peft_model(method, seed=4321, dropout=0.0):
    """A PEFT model whose trainable tensors are all random and non-zero (lora_B starts at 0)."""
    model = peft.get_peft_model(mlp(seed), config(method, dropout))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def pair(method):
    ref = peft_model(method)
    ours = copy.deepcopy(ref)
    swapped = lt.replace_peft_layers(ours, strict=True)
    assert len(swapped) == 2, swapped
    return ref, ours


def inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, IN, generator=g), torch.randn(3, 4, OUT, generator=g)


def close(a, b, name):
    err = float((a.detach() - b.detach()).abs().max())
    print(f"  {name}: max abs err {err:.3g}")
    assert err <= ATOL, (name, err)


@pytest.mark.parametrize("method", METHODS)
def test_outputs_and_gradients_match_peft(method):
    ref, ours = pair(method)
    kinds = {type(m).__name__ for m in ours.modules()}
    want = {"lora": "LoraLinear", "rslora": "LoraLinear", "dora": "DoraLinear",
            "vera": "VeraLinear", "adalora": "AdaLoraLinear"}[method]
    assert want in kinds
    x, dy = inputs()
    grads = {}
    for tag, model in (("peft", ref), ("lorafuse", ours)):
        xr = x.clone().requires_grad_(True)
        y = model(xr)
        (y * dy).sum().backward()
        grads[tag] = (y.detach(), xr.grad, {n: p.grad for n, p in model.named_parameters()})
    close(grads["lorafuse"][0], grads["peft"][0], "y")
    close(grads["lorafuse"][1], grads["peft"][1], "dx")
    g_ref, g_ours = grads["peft"][2], grads["lorafuse"][2]
    assert g_ref.keys() == g_ours.keys()  # same parameter names after the swap
    for n in g_ref:
        if g_ref[n] is None:
            assert g_ours[n] is None, f"{n}: frozen in PEFT, got a gradient"
        else:
            close(g_ours[n], g_ref[n], n)
    assert any(g is not None for g in g_ours.values())


@pytest.mark.parametrize("method", METHODS)
def test_swap_keeps_parameter_objects_and_names(method):
    model = peft_model(method)
    before = dict(model.named_parameters())
    keys = set(model.state_dict().keys())
    lt.replace_peft_layers(model, strict=True)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    for n in before:
        assert before[n] is after[n], n
    if method != "vera":  # PEFT keeps VeRA's projections at the model level too
        assert set(model.state_dict().keys()) == keys


@pytest.mark.parametrize("method", METHODS)
def test_adamw_steps_follow_peft(method):
    ref = peft_model(method)
    ours = copy.deepcopy(ref)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
            for m in (ref, ours)]
    # The optimizer exists before the swap: it must keep training the same tensors.
    lt.replace_peft_layers(ours, strict=True)
    x, target = inputs(11)
    losses = {0: [], 1: []}
    for step in range(6):
        for i, (m, opt) in enumerate(zip((ref, ours), opts)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), target)
            loss.backward()
            opt.step()
            if method == "adalora":  # PEFT's rank allocation, going by parameter names
                m.base_model.update_and_allocate(step)
            losses[i].append(loss.item())
    print(f"  peft     {np.round(losses[0], 6)}\n  lorafuse {np.round(losses[1], 6)}")
    assert losses[0][-1] < losses[0][0]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    mine = dict(ours.named_parameters())
    for n, p in ref.named_parameters():
        close(mine[n].detach(), p.detach(), n)


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "adalora"])
def test_merged_state_and_unmerge(method):
    ref = peft_model(method)
    ref.eval()
    x, _ = inputs(3)
    with torch.no_grad():
        y_unmerged = ref(x)
    ref.base_model.merge_adapter()
    ours = copy.deepcopy(ref)
    lt.replace_peft_layers(ours, strict=True)
    layers = [m for m in ours.modules() if isinstance(m, lt._AdapterLinear)]
    assert layers and all(m.merged for m in layers)
    with torch.no_grad():
        close(ours(x), ref(x), "merged y")
        for m in layers:
            m.unmerge()
        close(ours(x), y_unmerged, "unmerged y")
        for m in layers:
            m.merge()
        close(ours(x), ref(x), "re-merged y")


def test_unsupported_layers_are_left_to_peft_with_a_warning():
    model = peft_model("lora", dropout=0.1)
    with pytest.warns(UserWarning, match="dropout"):
        assert lt.replace_peft_layers(model) == []
    assert not any(isinstance(m, lt._AdapterLinear) for m in model.modules())
    with pytest.raises(ValueError, match="dropout"):
        lt.replace_peft_layers(model, strict=True)
    f64 = peft_model("dora").double()
    with pytest.raises(ValueError, match="float32"):
        lt.replace_peft_layers(f64, strict=True)


def test_modules_reject_wrong_dtype_naming_it():
    base = nn.Linear(IN, OUT)
    layer = lt.LoraLinear(base, torch.randn(3, IN), torch.randn(OUT, 3), 2.0)
    assert not base.weight.requires_grad
    with pytest.raises(TypeError, match="`x`.*float32"):
        layer(torch.randn(2, IN, dtype=torch.float64))
    with pytest.raises(ValueError, match="`x`"):
        layer(torch.randn(2, IN + 1))


def test_noncontiguous_input_and_plain_modules():
    """A transposed (non-contiguous) x works, and a hand-built DoraLinear matches torch math."""
    torch.manual_seed(5)
    base = nn.Linear(IN, OUT)
    a, b = nn.Parameter(torch.randn(4, IN) * 0.3), nn.Parameter(torch.randn(OUT, 4) * 0.3)
    m = nn.Parameter(torch.rand(OUT) + 0.5)
    layer = lt.DoraLinear(base, a, b, 1.5, m)
    x = torch.randn(IN, 6).t().requires_grad_(True)
    y = layer(x)
    w = base.weight + 1.5 * b @ a
    n = torch.linalg.norm(w, dim=1).detach()
    y_ref = (m / n) * (x @ base.weight.t() + 1.5 * (x @ a.t()) @ b.t()) + base.bias
    close(y, y_ref, "y")
    g = torch.autograd.grad(y.sum(), [x, a, b, m])
    g_ref = torch.autograd.grad(y_ref.sum(), [x, a, b, m])
    for name, u, v in zip(["dx", "dA", "dB", "dm"], g, g_ref):
        close(u, v, name)


def test_nf4_base_from_quantize_and_from_bnb():
    torch.manual_seed(9)
    lin = nn.Linear(64, 10)
    q = lt.Nf4Linear.from_linear(lin, blocksize=64, double_quant=True)
    w = torch.from_numpy(lorafuse.nf4.quantize(lin.weight.detach().numpy()).dequantize())
    assert torch.equal(q.weight, w)
    a, b = nn.Parameter(torch.randn(3, 64) * 0.2), nn.Parameter(torch.randn(10, 3) * 0.2)
    layer = lt.LoraLinear(q, a, b, 0.5)
    x = torch.randn(5, 64)
    close(layer(x), x @ w.t() + lin.bias + 0.5 * (x @ a.t()) @ b.t(), "qlora y")
    layer(x).sum().backward()
    assert a.grad is not None and b.grad is not None
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes not importable: from_bnb part skipped")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l4 = bnb.nn.Linear4bit(64, 10, compute_dtype=torch.float32, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(
            lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
            compress_statistics=True,
        )
        l4.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        l4 = l4.to("cpu")
    from_bnb = lt.Nf4Linear.from_bnb(l4)
    assert torch.equal(from_bnb.weight, w)  # bitsandbytes' bytes == ours
    close(from_bnb(x), l4(x), "Linear4bit y")


@pytest.mark.parametrize("threads", [1, 3])
def test_nf4_quantize_is_bitsandbytes_bit_for_bit_at_any_size(threads):
    """nf4.quantize against bitsandbytes' own quantize_4bit on shapes and seeds of this test
    (the double-quant offset is torch's mean of the absmax, whose summation order follows
    torch's thread count from 32768 blocks on and its CPU capability at any size)."""
    F = pytest.importorskip("bitsandbytes.functional")
    rng = np.random.default_rng(40 + threads)
    shapes = [(int(rng.integers(1, 70)), int(rng.integers(1, 300))) for _ in range(12)]
    shapes += [(1024, 2176), (700, 6000)]  # 34816 and 32812+ blocks: the threaded sum
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, shape in enumerate(shapes):
            bs = [64, 128, 32, 256][k % 4]
            w = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 2)).astype(np.float32)
            ours = lorafuse.nf4.quantize(w, blocksize=bs, double_quant=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, st = F.quantize_4bit(torch.from_numpy(w.copy()), blocksize=bs,
                                        compress_statistics=True, quant_type="nf4")
            assert np.array_equal(p.numpy().reshape(-1), ours.packed.reshape(-1)), (shape, bs)
            t = ours.to_bnb("w")
            assert np.array_equal(t["w.absmax"], st.absmax.numpy()), (shape, bs)
            assert np.float32(st.offset.item()) == ours_offset(t), (shape, bs, threads)
            absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
            assert absmax.numpy().tobytes() == ours.absmax_f32().tobytes(), (shape, bs)
    finally:
        torch.set_num_threads(before)
    # An explicit count is the order of a torch with that many threads, whatever this torch has.
    w = np.random.default_rng(41).standard_normal((1024, 2176)).astype(np.float32)
    theirs = {}
    for n in (1, 4):
        torch.set_num_threads(n)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, st = F.quantize_4bit(torch.from_numpy(w.copy()), blocksize=64,
                                        compress_statistics=True, quant_type="nf4")
        finally:
            torch.set_num_threads(before)
        theirs[n] = np.float32(st.offset.item())
    assert theirs[1] != theirs[4]  # this w tells the two orders apart
    for n in (1, 4):
        assert ours_offset(lorafuse.nf4.quantize(w, torch_threads=n).to_bnb("w")) == theirs[n], n


def ours_offset(t):
    import json

    return np.float32(json.loads(bytes(t["w.quant_state.bitsandbytes__nf4"]).decode())["nested_offset"])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_restore_then_save_pretrained_round_trips(method, tmp_path):
    ref = peft_model(method)
    ours = copy.deepcopy(ref)
    lt.replace_peft_layers(ours, strict=True)
    x, _ = inputs(5)
    ours(x).sum().backward()  # a step's worth of gradients, then change the weights
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.mul_(1.1)
    y = ours(x).detach()
    assert len(lt.restore_peft_layers(ours)) == 2
    assert not any(isinstance(m, lt._AdapterLinear) for m in ours.modules())
    close(ours(x), y, "restored y")
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(mlp(4321), tmp_path)
    close(loaded(x), y, "loaded y")


def test_cached_frozen_weight_follows_changes_of_the_base_weight():
    """The kernels reuse one copy of each base weight; a change autograd counts (copy_ under
    no_grad, as load_state_dict does) or a new storage must be seen by the next forward."""
    ref = peft_model("lora")
    ref.eval()
    ours = copy.deepcopy(ref)
    lt.replace_peft_layers(ours, strict=True)
    x, _ = inputs(3)
    with torch.no_grad():
        close(ours(x), ref(x), "y")
        for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
            if name.endswith("base_layer.weight"):
                p.add_(0.25)
                q.add_(0.25)
        close(ours(x), ref(x), "y after an in-place change")
        for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
            if name.endswith("base_layer.weight"):
                new = torch.randn_like(p)
                p.data = new.clone()
                q.data = new.clone()
        close(ours(x), ref(x), "y after a new storage")


def mlp_4bit(seed):
    """`mlp(seed)` with both Linears replaced by nf4 bitsandbytes Linear4bit layers (CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = mlp(seed)
    for i in (0, 2):
        lin = model[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32,
                                   quant_type="nf4")
            l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                          quant_type="nf4", blocksize=64, compress_statistics=True)
            l4.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            model[i] = l4.to("cpu")
    # What transformers sets on a model loaded in 4 bits: PEFT then builds its bnb layer classes.
    model.is_loaded_in_4bit = True
    return model


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_bnb_4bit_peft_layers_are_swapped_and_match(method):
    """QLoRA, QDoRA and 4-bit AdaLoRA: PEFT's bitsandbytes layers swap to lorafuse modules over
    an Nf4Linear with the same bytes, and give PEFT's outputs and gradients."""
    ref = peft.get_peft_model(mlp_4bit(77), config(method))
    g = torch.Generator().manual_seed(78)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    peft_bnb = [type(m).__module__ for m in ref.modules() if type(m).__module__.startswith("peft")
                and type(m).__name__ in ("Linear4bit", "SVDLinear4bit")]
    assert len(peft_bnb) == 2 and all(m.endswith(".bnb") for m in peft_bnb), peft_bnb
    ours = copy.deepcopy(ref)
    assert len(lt.replace_peft_layers(ours, strict=True)) == 2
    bases = [m.base_layer for m in ours.modules() if isinstance(m, lt._AdapterLinear)]
    assert len(bases) == 2 and all(isinstance(b, lt.Nf4Linear) for b in bases)
    x, dy = inputs(11)
    out = {}
    for tag, model in (("peft", ref), ("lorafuse", ours)):
        xr = x.clone().requires_grad_(True)
        y = model(xr)
        (y * dy).sum().backward()
        out[tag] = (y.detach(), xr.grad, {n: p.grad for n, p in model.named_parameters()
                                           if p.requires_grad})
    close(out["lorafuse"][0], out["peft"][0], "y")
    close(out["lorafuse"][1], out["peft"][1], "dx")
    assert out["peft"][2].keys() == out["lorafuse"][2].keys()
    for n, gr in out["peft"][2].items():
        close(out["lorafuse"][2][n], gr, n)
    # Back to PEFT's layers (same adapter Parameters, the original 4-bit base).
    assert len(lt.restore_peft_layers(ours)) == 2
    close(ours(x), ref(x), "restored y")


def test_merged_4bit_layer_is_left_to_peft():
    model = peft.get_peft_model(mlp_4bit(79), config("lora"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.base_model.merge_adapter()
    with pytest.raises(ValueError, match="merged 4-bit"):
        lt.replace_peft_layers(model, strict=True)
