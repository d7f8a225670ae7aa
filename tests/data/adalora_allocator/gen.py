"""Reference numbers for tests/adalora_allocator.rs from PEFT's AdaLoRA RankAllocator.

Run: python tests/data/adalora_allocator/gen.py (with the peers venv of scripts/setup-peers.sh)
Writes reference.json next to this file. Deterministic (torch.manual_seed(0), CPU, f32).
"""
import json, os, types
import torch
import peft
from peft import AdaLoraConfig, get_peft_model

torch.manual_seed(0)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 12)
        self.fc2 = torch.nn.Linear(12, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


INIT_R, TARGET_R, TINIT, TFINAL, DELTA_T, TOTAL = 4, 2, 2, 3, 2, 12
cfg = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T,
                    total_step=TOTAL, beta1=0.85, beta2=0.7, orth_reg_weight=0.3, lora_alpha=8,
                    target_modules=["fc1", "fc2"])
model = get_peft_model(MLP(), cfg)
inner = model.base_model  # AdaLoraModel
alloc = inner.rankallocator
layers = ["fc1", "fc2"]


def param(layer, kind):
    return getattr(getattr(inner.model, layer), kind)["default"]


# Random non-zero starting values (PEFT's init sets E = 0; nonzero E exercises the scores).
with torch.no_grad():
    for l in layers:
        for k in ("lora_A", "lora_B", "lora_E"):
            param(l, k).copy_(torch.randn_like(param(l, k)) * 0.5)

# Record kthvalue's input and output (scores and threshold) and the budget.
rec = {}
_kth = torch.kthvalue


def kth(x, k, *a, **kw):
    out = _kth(x, k, *a, **kw)
    rec["scores"] = x.tolist()
    rec["k"] = k
    rec["threshold"] = out[0].item()
    return out


torch.kthvalue = kth
_bs = alloc.budget_schedule


def bs(step):
    b, m = _bs(step)
    rec["budget"] = b
    rec["mask_ind"] = bool(m)
    return b, m


alloc.budget_schedule = bs

steps = []
for step in range(1, TOTAL + 3):
    # A fake training step: fixed random grads, SGD update, then update_and_allocate.
    grads = {}
    for l in layers:
        for k in ("lora_A", "lora_B", "lora_E"):
            p = param(l, k)
            g = torch.randn_like(p)
            with torch.no_grad():
                p -= 0.05 * g
            p.grad = g.clone()
            grads[(l, k)] = g
    before = {f"{l}.{k}": param(l, k).detach().clone().reshape(-1).tolist() for l in layers
              for k in ("lora_A", "lora_B", "lora_E")}
    rec.clear()
    inner.update_and_allocate(step)
    entry = {
        "step": step,
        "values": before,
        "grads": {f"{l}.{k}": grads[(l, k)].reshape(-1).tolist() for l in layers
                  for k in ("lora_A", "lora_B", "lora_E")},
        "e_after": {l: param(l, "lora_E").detach().reshape(-1).tolist() for l in layers},
        "budget": rec.get("budget"),
        "mask_ind": rec.get("mask_ind"),
        "threshold": rec.get("threshold"),
        "k": rec.get("k"),
        "scores": rec.get("scores"),
        "rank_pattern": None if cfg.rank_pattern is None else
        {k: list(map(bool, v)) for k, v in cfg.rank_pattern.items()},
        "exp_avg_ipt": {n: t.reshape(-1).tolist() for n, t in alloc.exp_avg_ipt.items()},
        "exp_avg_unc": {n: t.reshape(-1).tolist() for n, t in alloc.exp_avg_unc.items()},
    }
    steps.append(entry)
    for p in model.parameters():
        p.grad = None
torch.kthvalue = _kth

# Orthogonal regulariser: PEFT adds it in AdaLoraModel.forward when the output has `.loss`.
class Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        y = self.m(x)
        return types.SimpleNamespace(loss=y.sum() * 0.0)

orth_values = {f"{l}.{k}": param(l, k).detach().reshape(-1).tolist() for l in layers for k in ("lora_A", "lora_B")}
inner.model.forward = types.MethodType(lambda self, x: types.SimpleNamespace(loss=MLP.forward(self, x).sum() * 0.0), inner.model)
for p in model.parameters():
    p.grad = None
out = inner(torch.zeros(1, 8))
out.loss.backward()
orth = {
    "weight": cfg.orth_reg_weight,
    "values": orth_values,
    "loss": out.loss.item(),
    "grads": {f"{l}.{k}": param(l, k).grad.reshape(-1).tolist() for l in layers for k in ("lora_A", "lora_B")},
    "norms": {},
}
with torch.no_grad():
    for l in layers:
        a, b = param(l, "lora_A"), param(l, "lora_B")
        orth["norms"][f"{l}.lora_A"] = torch.norm(a @ a.T - torch.eye(a.shape[0]), p="fro").item()
        orth["norms"][f"{l}.lora_B"] = torch.norm(b.T @ b - torch.eye(b.shape[1]), p="fro").item()

ref = {
    "peft_version": peft.__version__,
    "torch_version": torch.__version__,
    "config": {"init_r": INIT_R, "target_r": TARGET_R, "tinit": TINIT, "tfinal": TFINAL, "delta_t": DELTA_T,
               "total_step": TOTAL, "beta1": cfg.beta1, "beta2": cfg.beta2},
    "layers": {l: {"in": getattr(inner.model, l).in_features, "out": getattr(inner.model, l).out_features}
               for l in layers},
    "steps": steps,
    "orth": orth,
}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.json"), "w") as f:
    json.dump(ref, f)
print("ok", peft.__version__, len(steps))
