#!/usr/bin/env python3
"""Check a LoRA adapter saved by lorafuse (PEFT format) against PEFT itself.

    PEERS/venv/bin/python scripts/peft_check_adapter.py \
        --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --adapter runs/x/adapter --text "Hello, world!" --logits out/logits.safetensors

Loads the fp32 transformers model from the GGUF, applies PeftModel.from_pretrained(model, ADAPTER), tokenizes
TEXT with the GGUF tokenizer (add_special_tokens=False, batch 1, no padding), and compares the last-position
logits with the `logits` tensor (f32 [vocab]) in FILE (as written by `lorafuse logits`, which also stores
`input_ids`, int64 or int32 [T]). Asserts the input ids are equal; prints max |diff|, argmax agreement and the
top-5 of both; exits 1 if the ids differ or max |diff| > --tol (default 1e-3), 0 otherwise.
It also prints how far the adapter moves the logits from the base model: if that is below --tol too, the
comparison cannot tell a correct adapter from an ignored one (a warning is printed).

Note for lorafuse: PEFT adapters hold lora_B rows of q_proj/k_proj in transformers (un-permuted) order; an
implementation that keeps llama.cpp's permuted GGUF row order must permute lora_B rows of q/k when exporting
(tests/golden/smollm2/README.md, "q/k permutation").

`--selftest DIR` proves the script without lorafuse: it saves a PEFT adapter with random nonzero A and B in
DIR/adapter, writes DIR/logits.safetensors with torch, then runs the check on them (must pass) and on a
perturbed logits file and a wrong-id file (must fail).
"""
import argparse
import json
import os
import sys

DEFAULT_MODEL = os.environ.get("LORAFUSE_MODEL") or os.path.join(os.environ.get("LORAFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorafuse"), "SmolLM2-135M-Instruct.Q4_1.gguf")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_base(model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = os.path.split(os.path.abspath(model_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    return tok, model


def last_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=ids[None, :]).logits[0, -1].float()


def check(tok, base_model, adapter, text, logits_file, tol):
    """Returns (ok, report dict). base_model is wrapped by PeftModel (and unwrapped again)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)
    ref = load_file(logits_file)
    if "logits" not in ref or "input_ids" not in ref:
        raise SystemExit(f"{logits_file}: needs tensors 'input_ids' and 'logits', has {sorted(ref)}")
    ref_ids = ref["input_ids"].reshape(-1).to(torch.long)
    ref_logits = ref["logits"].reshape(-1).float()
    rep = {"text": text, "n_tokens": int(ids.numel()), "input_ids": ids.tolist()}
    if ref_ids.tolist() != ids.tolist():
        rep["input_ids_file"] = ref_ids.tolist()
        rep["ok"] = False
        rep["error"] = "input_ids differ"
        return False, rep

    base = last_logits(base_model, ids)
    model = PeftModel.from_pretrained(base_model, adapter)
    model.eval()
    ours = last_logits(model, ids)
    # Remove the injected layers again so base_model can be reused (prompt-learning models
    # inject none: the base model is untouched).
    if not model.peft_config[model.active_adapter].is_prompt_learning:
        model.unload()
    if ref_logits.shape != ours.shape:
        rep["ok"] = False
        rep["error"] = f"logits shape {tuple(ref_logits.shape)} != {tuple(ours.shape)}"
        return False, rep
    diff = (ours - ref_logits).abs()
    t5p = torch.topk(ours, 5)
    t5f = torch.topk(ref_logits, 5)
    rep.update({
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "argmax_peft": int(ours.argmax()), "argmax_file": int(ref_logits.argmax()),
        "argmax_agree": int(ours.argmax()) == int(ref_logits.argmax()),
        "top5_peft": [[int(i), round(float(v), 5)] for v, i in zip(t5p.values, t5p.indices)],
        "top5_file": [[int(i), round(float(v), 5)] for v, i in zip(t5f.values, t5f.indices)],
        "top5_same_ids": t5p.indices.tolist() == t5f.indices.tolist(),
        "adapter_effect_max_abs": float((ours - base).abs().max()),
        "file_vs_base_max_abs": float((ref_logits - base).abs().max()),
        "tol": tol,
    })
    rep["ok"] = rep["max_abs_diff"] <= tol
    return rep["ok"], rep


def print_report(rep, tok=None):
    print(f"text: {rep['text']!r} ({rep['n_tokens']} tokens)")
    if "error" in rep:
        print(f"FAIL: {rep['error']}")
        if "input_ids_file" in rep:
            print(f"  tokenizer: {rep['input_ids']}\n  file:      {rep['input_ids_file']}")
        return
    print(f"input_ids equal: {rep['input_ids']}")
    print(f"max |logits_peft - logits_file| = {rep['max_abs_diff']:.3e} (mean {rep['mean_abs_diff']:.3e}, tol {rep['tol']:g})")
    print(f"argmax agree: {rep['argmax_agree']} (peft {rep['argmax_peft']}, file {rep['argmax_file']}); "
          f"top-5 ids same: {rep['top5_same_ids']}")
    dec = (lambda i: repr(tok.decode([i]))) if tok is not None else (lambda i: "")
    print("top-5 peft: " + ", ".join(f"{i} {dec(i)} {v:.4f}" for i, v in rep["top5_peft"]))
    print("top-5 file: " + ", ".join(f"{i} {dec(i)} {v:.4f}" for i, v in rep["top5_file"]))
    print(f"adapter moves the logits by up to {rep['adapter_effect_max_abs']:.3e} vs the base model "
          f"(file vs base: {rep['file_vs_base_max_abs']:.3e})")
    if rep["adapter_effect_max_abs"] <= rep["tol"]:
        print("WARNING: the adapter barely changes the logits (B ~ 0?): this check cannot tell it from no adapter")
    print("PASS" if rep["ok"] else "FAIL: max abs diff above tolerance")


def selftest(out_dir, model_path, text, tol, seed):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tok, base = load_base(model_path)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=TARGETS)
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)  # nonzero B (PEFT inits it to 0), so the adapter really changes the logits
    pm.eval()
    adapter_dir = os.path.join(out_dir, "adapter")
    pm.save_pretrained(adapter_dir)
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)
    logits = last_logits(pm, ids)
    base = pm.unload()
    good = os.path.join(out_dir, "logits.safetensors")
    save_file({"input_ids": ids, "logits": logits.contiguous()}, good, metadata={"text": text})
    # int32 ids variant (lorafuse may write int32)
    good32 = os.path.join(out_dir, "logits_i32.safetensors")
    save_file({"input_ids": ids.to(torch.int32), "logits": logits.contiguous()}, good32)
    bad = os.path.join(out_dir, "logits_perturbed.safetensors")
    pert = logits.clone()
    pert[int(logits.argmin())] += 5e-3
    save_file({"input_ids": ids, "logits": pert}, bad)
    badids = os.path.join(out_dir, "logits_wrong_ids.safetensors")
    save_file({"input_ids": torch.cat([ids[:-1], ids[-1:] + 1]), "logits": logits.contiguous()}, badids)

    results = {}
    for label, f, want in [("good", good, True), ("good_int32_ids", good32, True),
                           ("perturbed_5e-3", bad, False), ("wrong_ids", badids, False)]:
        print(f"\n== selftest case {label}: expect {'PASS' if want else 'FAIL'}")
        ok, rep = check(tok, base, adapter_dir, text, f, tol)
        print_report(rep, tok)
        results[label] = {"ok": ok, "expected": want, "max_abs_diff": rep.get("max_abs_diff")}
        if ok != want:
            print(f"SELFTEST FAILED on case {label}")
            return 1
    print("\nselftest OK:", json.dumps(results))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the GGUF file")
    ap.add_argument("--adapter", help="PEFT adapter dir (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--text", default="Hello, world!")
    ap.add_argument("--logits", help="safetensors with input_ids [T] and logits f32 [vocab]")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--selftest", metavar="DIR", help="build a random-B adapter + logits file in DIR and check them")
    ap.add_argument("--seed", type=int, default=0, help="selftest: torch seed for the random adapter")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    if args.selftest:
        return selftest(args.selftest, args.model, args.text, args.tol, args.seed)
    if not args.adapter or not args.logits:
        ap.error("--adapter and --logits are required (or --selftest DIR)")
    tok, base = load_base(args.model)
    ok, rep = check(tok, base, args.adapter, args.text, args.logits, args.tol)
    print_report(rep, tok)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
