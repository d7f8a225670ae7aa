#!/usr/bin/env python3
"""Check a bottleneck adapter or an AdapterFusion saved by lorafuse against the `adapters`
library 1.3.0 itself, on the real model.

    PYTHONPATH=.peers/adapters-site .peers/venv/bin/python scripts/adapters_check.py \
        --adapter runs/houlsby --logits out/logits.safetensors --text "Hello, world!"

Loads the fp32 transformers model from the GGUF (transformers 4.57.6, the release adapters 1.3.0
needs: put .peers/adapters-site first on PYTHONPATH), calls `adapters.init(model)`, then
`model.load_adapter(DIR)` and activates it, or for a fusion folder (adapter_fusion_config.json)
loads each fused adapter from its subfolder, `model.load_adapter_fusion(DIR)` and activates
`Fuse(...)`. TEXT is tokenized with the GGUF tokenizer (add_special_tokens=False, batch 1) and the
last-position logits are compared with the `logits` tensor (f32 [vocab]) that `lorafuse logits
--adapter DIR` wrote (its `input_ids` must be the same). Exits 1 if max |diff| > --tol (default
1e-3) or the ids differ; prints how far the adapter moves the logits from the base model, so that
an ignored adapter cannot pass unnoticed.
"""
import argparse
import json
import os
import sys

DEFAULT_MODEL = os.environ.get("LORAFUSE_MODEL") or os.path.join(
    os.environ.get("LORAFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorafuse"),
    "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--logits", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()

    import torch
    import adapters
    from adapters import Fuse
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    ids = torch.tensor(tok(args.text, add_special_tokens=False).input_ids, dtype=torch.long)
    ref = load_file(args.logits)
    if ref["input_ids"].reshape(-1).tolist() != ids.tolist():
        print(f"FAIL: input ids differ: file {ref['input_ids'].tolist()} vs {ids.tolist()}")
        return 1
    ref_logits = ref["logits"].reshape(-1).float()

    with torch.no_grad():
        base = model(input_ids=ids[None]).logits[0, -1].float()
    adapters.init(model)
    fusion_cfg = os.path.join(args.adapter, "adapter_fusion_config.json")
    if os.path.exists(fusion_cfg):
        names = json.load(open(fusion_cfg))["adapter_names"]
        for n in names:
            model.load_adapter(os.path.join(args.adapter, n), load_as=n, with_head=False, use_safetensors=True)
        model.load_adapter_fusion(args.adapter, set_active=True, use_safetensors=True)
        model.set_active_adapters(Fuse(*names))
        what = f"fusion of {names}"
    else:
        n = model.load_adapter(args.adapter, with_head=False, use_safetensors=True)
        model.set_active_adapters(n)
        what = f"adapter {n}"
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids[None]).logits[0, -1].float()
    diff = (ours - ref_logits).abs().max().item()
    moved = (ours - base).abs().max().item()
    top = lambda v: ", ".join(f"{i} {tok.decode([i])!r} {v[i]:.4f}" for i in torch.topk(v, 5).indices.tolist())
    print(f"{what}: max |adapters - lorafuse| = {diff:.3e} over {ids.numel()} tokens")
    print(f"top-5 adapters: {top(ours)}")
    print(f"top-5 file:     {top(ref_logits)}")
    print(f"adapter moves the logits by up to {moved:.3e} vs the base model")
    if moved <= args.tol:
        print("WARNING: the adapter barely moves the logits; this check cannot tell it from an ignored one")
    ok = diff <= args.tol
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
