#!/usr/bin/env python3
"""PEFT reference of lorafuse's default fine-tuning recipe (SmolLM2-135M-Instruct GGUF, chatterbot), for LoRA
and (--method) the additive and selective methods, in PEFT or the `adapters` library.

Runs in the peers venv (scripts/setup-peers.sh), CPU, fp32:

    PEERS/venv/bin/python scripts/peft_finetune.py --out peft_result.json   # PEERS: scripts/setup-peers.sh

Task spec: tests/golden/smollm2/SPEC.md (+ README.md). Recipe = lorafuse's CLI defaults:
  * LoRA r=8, alpha=16, dropout 0, bias none, targets q,k,v,o,gate,up,down (torch.manual_seed(--lora-seed)
    immediately before get_peft_model, so A is PEFT's kaiming-uniform init from that seed and B = 0).
  * torch.optim.AdamW(lr 2e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 0); NO gradient clipping.
  * transformers.get_linear_schedule_with_warmup(opt, 5, 60), scheduler.step() after every optimizer step.
    That is LambdaLR with factor k/5 for k < 5 and (60-k)/55 for k >= 5, where k = number of scheduler steps
    taken so far = 0-based index of the training step. So step 0 runs with lr = 0 (a no-op update of the
    weights, but AdamW's moments and step count still advance), steps 1..4 with 0.4e-4 .. 1.6e-4, step 5 with
    2e-4, and the last step (59) with 2e-4/55. (Not 2e-4*(k+1)/5 during warmup.)
  * batch 8, 60 steps, fp32, torch.set_num_threads(2); model.train() for steps, model.eval() for evaluation.
  * training order: shuffled_order(914, seed, epoch) (SplitMix64 + Fisher-Yates, scripts/lorafuse_order.py if
    present, else the identical implementation below); batches = 8 consecutive entries of that order.
  * batches right-padded to their longest sequence with id 2, attention_mask 0 and label -100 on padding.
  * loss = sum of CE over labels != -100 (after the causal shift) / their count, over the whole batch; this is
    exactly what model(labels=...) computes (checked at start-up).
  * eval loss = sum CE over all 101 eval examples / 1707 target tokens, eval mode, batch 8, in index order.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GOLDEN = os.environ.get("LORAFUSE_GOLDEN", os.path.join(REPO, "tests", "golden", "smollm2"))

MASK64 = (1 << 64) - 1
GOLDEN_RATIO = 0x9E3779B97F4A7C15


# ---------------------------------------------------------------- order (same as scripts/lorafuse_order.py)
def _splitmix64(state):
    def nxt():
        nonlocal state
        state = (state + GOLDEN_RATIO) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)
    return nxt


def local_shuffled_order(n, seed, epoch):
    nxt = _splitmix64((seed ^ ((epoch * GOLDEN_RATIO) & MASK64)) & MASK64)
    order = list(range(n))
    for i in reversed(range(1, n)):
        j = nxt() % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def get_shuffled_order():
    """Prefer the project's scripts/lorafuse_order.py; check it agrees with the local copy."""
    try:
        sys.path.insert(0, HERE)
        from lorafuse_order import shuffled_order  # type: ignore
    except ImportError:
        return local_shuffled_order, "local (scripts/lorafuse_order.py not found)"
    for n, seed, epoch in [(914, 42, 0), (914, 42, 1), (10, 7, 3)]:
        a, b = list(shuffled_order(n, seed, epoch)), local_shuffled_order(n, seed, epoch)
        if a != b:
            raise SystemExit(f"lorafuse_order.shuffled_order({n},{seed},{epoch}) disagrees with the brief's definition")
    return shuffled_order, "scripts/lorafuse_order.py (agrees with local copy)"


# ---------------------------------------------------------------- data
def pairs_from_yaml(corpus_dir):
    import yaml
    files = sorted(glob.glob(os.path.join(corpus_dir, "*.yml")), key=lambda p: os.path.basename(p).encode())
    seen, pairs = set(), []
    for path in files:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list):
                conv = [conv]
            for i in range(0, len(conv) - 1, 2):
                q, a = str(conv[i]).strip(), str(conv[i + 1]).strip()
                if not q or not a or (q, a) in seen:
                    continue
                seen.add((q, a))
                pairs.append((q, a))
    return pairs


def load_pairs(data_path, corpus_dir):
    if data_path and os.path.exists(data_path):
        pairs = []
        with open(data_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    o = json.loads(line)
                    pairs.append((o["question"], o["answer"]))
        return pairs, data_path
    if not corpus_dir:
        raise SystemExit(f"ERROR: {data_path} not found; pass --data, or --corpus with the "
                         "chatterbot-corpus english/*.yml directory")
    return pairs_from_yaml(corpus_dir), f"built from {corpus_dir}/*.yml ({data_path} not found)"


def pairs_sha256(pairs):
    h = hashlib.sha256()
    for q, a in pairs:
        h.update(q.encode() + b"\0" + a.encode() + b"\0")
    return h.hexdigest()


def encode(tok, q, a, max_len):
    prompt = "<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n"
    full = prompt + a + "<|im_end|>"
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    f_ids = tok(full, add_special_tokens=False).input_ids
    if f_ids[: len(p_ids)] != p_ids:
        raise SystemExit(f"prompt tokens are not a prefix of full-text tokens for {q!r}")
    labels = [-100] * len(p_ids) + f_ids[len(p_ids):]
    return f_ids[:max_len], labels[:max_len]


def collate(examples, pad_id=2):
    import torch
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attn[b, : len(ids)] = 1
        labels[b, : len(lab)] = torch.tensor(lab)
    return input_ids, attn, labels


def ce_sum_count(logits, labels):
    """Sum of CE over shifted labels != -100 and their count (logits at t score label t+1)."""
    import torch.nn.functional as F
    sl = labels[:, 1:]
    lg = logits[:, :-1, :].float()
    s = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), sl.reshape(-1), ignore_index=-100, reduction="sum")
    return s, int((sl != -100).sum())


def evaluate(model, examples, bs, prepended=0):
    import torch
    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), bs):
            ids, attn, lab = collate(examples[i: i + bs])
            logits = model(input_ids=ids, attention_mask=attn).logits[:, prepended:]
            s, c = ce_sum_count(logits, lab)
            tot += float(s)
            cnt += c
    return tot / cnt, tot, cnt


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("LORAFUSE_MODEL") or os.path.join(os.environ.get("LORAFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorafuse"), "SmolLM2-135M-Instruct.Q4_1.gguf"),
                    help="the GGUF (default: $LORAFUSE_MODEL, else the file `lorafuse fetch` caches)")
    ap.add_argument("--data", default=os.path.join(REPO, "data", "chatterbot_en.jsonl"))
    ap.add_argument("--corpus", default=None,
                    help="fallback: build pairs from these *.yml when --data does not exist")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=42, help="data-order seed (shuffled_order)")
    ap.add_argument("--lora-seed", type=int, default=42, help="torch.manual_seed before get_peft_model")
    ap.add_argument("--order", choices=["shuffled", "identity"], default="shuffled",
                    help="shuffled = lorafuse's shuffled_order (the recipe); identity = train examples in index "
                         "order, which is what tests/golden/smollm2/README.md's step-0/1 losses "
                         "(3.203598, 3.903128) were measured with")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--method", default="lora", choices=METHODS,
                    help="the PEFT method (houlsby, pfeiffer, adapter_fusion: the adapters library; run those "
                         "with .peers/adapters-site first on PYTHONPATH)")
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eval", action="store_true", help="skip eval before/after (timing runs)")
    ap.add_argument("--save-adapter", default=None, help="save the trained PEFT adapter to this dir")
    ap.add_argument("--out", default="peft_result.json")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    stats = json.load(open(os.path.join(GOLDEN, "data_stats.json")))
    t_start = time.time()
    load_start = loadavg()

    # ---- data
    pairs, data_src = load_pairs(args.data, args.corpus)
    sha = pairs_sha256(pairs)
    assert len(pairs) == stats["N"] == 1015, len(pairs)
    assert sha == stats["pairs_sha256"], f"pairs_sha256 mismatch: {sha}"
    train_idx = [i for i in range(len(pairs)) if i % 10 != 9]
    eval_idx = [i for i in range(len(pairs)) if i % 10 == 9]
    assert len(train_idx) == 914 and len(eval_idx) == 101
    print(f"data: {data_src}: N={len(pairs)} train={len(train_idx)} eval={len(eval_idx)} sha ok", flush=True)

    model_dir, gguf_name = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_name)
    enc = [encode(tok, q, a, args.max_len) for q, a in pairs]
    train_ex = [enc[i] for i in train_idx]
    eval_ex = [enc[i] for i in eval_idx]
    n_eval_t = sum(sum(1 for l in lab[1:] if l != -100) for _, lab in eval_ex)
    n_train_t = sum(sum(1 for l in lab[1:] if l != -100) for _, lab in train_ex)
    assert n_eval_t == stats["eval_target_tokens_total"] == 1707, n_eval_t
    assert n_train_t == stats["train_target_tokens_total"], n_train_t
    h = hashlib.sha256()
    for ids, _ in eval_ex:
        h.update(b"".join(int(t).to_bytes(4, "little") for t in ids))
    assert h.hexdigest() == stats["eval_input_ids_sha256"], "eval_input_ids_sha256 mismatch"

    # ---- model
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_name, dtype=torch.float32)
    model.eval()

    # check: first 3 TRAIN pairs as one right-padded batch (base model) -> ce_sum 155.9453 over 45 targets,
    # and HF's model(labels=) equals our sum/count.
    ref = stats["first_3_train_pairs_as_one_batch"]
    ids, attn, lab = collate([enc[i] for i in ref["pair_indices"]])
    assert list(ids.shape) == ref["padded_shape"], ids.shape
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, labels=lab)
        s, c = ce_sum_count(out.logits, lab)
    assert c == ref["n_target_tokens"] == 45, c
    assert abs(float(s) - ref["ce_sum"]) < 2e-3, f"first-3 batch ce_sum {float(s)} != {ref['ce_sum']}"
    hf_vs_ours = abs(float(out.loss) - float(s) / c)
    assert hf_vs_ours < 1e-5, f"model(labels=) {float(out.loss)} != sum/count {float(s) / c}"
    print(f"check first-3 batch: ce_sum={float(s):.4f} (golden {ref['ce_sum']:.4f}) n={c}; "
          f"model(labels=)={float(out.loss):.6f} == sum/count={float(s) / c:.6f} (|d|={hf_vs_ours:.1e})", flush=True)

    # ---- the method (lorafuse's defaults for each; see build_method)
    model, n_trainable, prepended = build_method(args, model)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"{args.method}: trainable {n_trainable} / {n_total}", flush=True)

    eval_before = None
    if not args.no_eval:
        t0 = time.perf_counter()
        eval_before, s_b, c_b = evaluate(model, eval_ex, args.eval_batch_size, prepended)
        t_eval = time.perf_counter() - t0
        print(f"eval before: {eval_before:.6f} (sum {s_b:.4f} / {c_b}) [{t_eval:.1f}s]", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, args.warmup, args.steps)
    shuffled_order, order_src = get_shuffled_order()
    if args.order == "identity":
        shuffled_order, order_src = (lambda n, seed, epoch: list(range(n))), "identity (index order, no shuffle)"

    # batch stream: 8 consecutive entries of shuffled_order(914, seed, epoch); when fewer than a full batch
    # remain, the next epoch's permutation starts (tail dropped; irrelevant for 60 steps = 480 < 914 examples).
    epoch, pos, order = 0, 0, shuffled_order(len(train_ex), args.seed, 0)
    steps = []
    model.train()
    for k in range(args.steps):
        if pos + args.batch_size > len(order):
            epoch, pos = epoch + 1, 0
            order = shuffled_order(len(train_ex), args.seed, epoch)
        batch_pos = order[pos: pos + args.batch_size]
        pos += args.batch_size
        lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        ids, attn, lab = collate([train_ex[j] for j in batch_pos])
        logits = model(input_ids=ids, attention_mask=attn).logits[:, prepended:]
        s, c = ce_sum_count(logits, lab)
        loss = s / c
        loss.backward()
        opt.step()          # no gradient clipping
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = {"step": k, "loss": float(loss.detach()), "lr": lr, "sec": dt, "epoch": epoch,
               "train_positions": batch_pos, "pair_indices": [train_idx[j] for j in batch_pos],
               "shape": list(ids.shape), "input_tokens": int(attn.sum()), "target_tokens": c,
               "loadavg1": loadavg()[0]}
        steps.append(row)
        print(f"step {k:3d} loss {row['loss']:.6f} lr {lr:.3e} shape {row['shape']} targets {c:4d} "
              f"{dt:.3f}s load {row['loadavg1']:.2f}", flush=True)
    model.eval()

    eval_after = None
    if not args.no_eval:
        eval_after, s_a, c_a = evaluate(model, eval_ex, args.eval_batch_size, prepended)
        print(f"eval after: {eval_after:.6f} (sum {s_a:.4f} / {c_a})", flush=True)

    secs = [r["sec"] for r in steps]
    tot_sec = sum(secs)
    in_tok = sum(r["input_tokens"] for r in steps)
    pad_tok = sum(r["shape"][0] * r["shape"][1] for r in steps)
    tgt_tok = sum(r["target_tokens"] for r in steps)
    golden_losses = {0: 3.203598, 1: 3.903128}
    res = {
        "recipe": {
            "model": os.path.abspath(args.model), "data": data_src, "pairs_sha256": sha,
            "order": order_src, "seed": args.seed, "lora_seed": args.lora_seed, "steps": args.steps,
            "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "max_len": args.max_len,
            "method": args.method,
            "lora": {"r": args.rank, "alpha": args.alpha, "dropout": 0.0, "bias": "none"}
            if args.method == "lora" else None,
            "optimizer": {"name": "torch.optim.AdamW", "lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                          "weight_decay": 0.0},
            "schedule": f"transformers.get_linear_schedule_with_warmup(warmup={args.warmup}, total={args.steps}): "
                        "lr_k = lr*k/warmup for k<warmup (step 0: lr 0), lr*(total-k)/(total-warmup) after",
            "grad_clip": None, "dtype": "float32", "pad_id": 2,
            "loss": "sum CE over labels!=-100 (causal shift) / count, whole batch",
        },
        "checks": {
            "first3_batch_ce_sum": ref["ce_sum"], "model_labels_equals_sum_over_count_absdiff": hf_vs_ours,
            "eval_target_tokens": n_eval_t, "train_target_tokens": n_train_t,
            "golden_step_losses": golden_losses,
            "golden_step_losses_note": "README's step-0/1 losses are the base model's loss on the first two "
                                       "batches of the IDENTITY order; they match only with --order identity",
            "step_loss_absdiff_vs_golden": {k: abs(steps[k]["loss"] - v) for k, v in golden_losses.items()
                                           if k < len(steps)},
        },
        "lora_trainable_params": n_trainable,
        "trainable_params": n_trainable,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_rel_drop": (eval_before - eval_after) / eval_before if eval_before and eval_after else None,
        "sec_per_step_median": statistics.median(secs),
        "sec_per_step_mean": statistics.mean(secs),
        "sec_per_step_median_excl_step0": statistics.median(secs[1:]) if len(secs) > 1 else None,
        "sec_per_step_min": min(secs), "sec_per_step_max": max(secs),
        "train_seconds_total": tot_sec,
        "input_tokens_per_s": in_tok / tot_sec,
        "padded_tokens_per_s": pad_tok / tot_sec,
        "target_tokens_per_s": tgt_tok / tot_sec,
        "tokens_note": "input = non-pad tokens (attention_mask 1); padded = B*T incl. padding; target = labels!=-100",
        "final_train_loss": steps[-1]["loss"] if steps else None,
        "steps": steps,
        "env": {
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "nproc": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "loadavg_start": load_start, "loadavg_end": loadavg(),
            "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "wall_seconds": time.time() - t_start,
        },
    }
    if args.save_adapter:
        model.save_pretrained(args.save_adapter)
        res["adapter_dir"] = args.save_adapter
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k not in ("steps", "recipe")}, indent=1))
    print(f"wrote {args.out}")


METHODS = ["lora", "ia3", "beft", "ln_tuning", "prompt_tuning", "p_tuning", "prefix_tuning", "houlsby",
           "pfeiffer", "adapter_fusion"]


def build_method(args, model):
    """The method on `model` with lorafuse's defaults (its README's table): PEFT for LoRA (all seven
    projections), IA3 (k, v, down; down scales its input), BEFT (v), LN tuning (both norms and the final
    one), prompt tuning (RANDOM), P-tuning (MLP, encoder_hidden_size = hidden) and prefix tuning (no
    projection), each with --num-virtual-tokens; the adapters library 1.3.0 for Houlsby (DoubleSeqBnConfig)
    and Pfeiffer (SeqBnConfig), reduction factor 16, and AdapterFusion over two fresh Pfeiffer adapters (a
    dynamic Fuse; their values do not change the step's cost). Returns (model, trainable parameters, number
    of virtual positions the logits start with)."""
    import torch
    torch.manual_seed(args.lora_seed)
    m = args.method
    nvt = args.num_virtual_tokens
    if m in ("houlsby", "pfeiffer", "adapter_fusion"):
        import adapters
        from adapters import DoubleSeqBnConfig, Fuse, SeqBnConfig
        adapters.init(model)
        if m == "adapter_fusion":
            for n in ("a", "b"):
                model.add_adapter(n, config=SeqBnConfig(reduction_factor=16))
            fuse = Fuse("a", "b")
            model.add_adapter_fusion(fuse)
            model.train_adapter_fusion(fuse)
        else:
            cfg = DoubleSeqBnConfig(reduction_factor=16) if m == "houlsby" else SeqBnConfig(reduction_factor=16)
            model.add_adapter(m, config=cfg)
            model.train_adapter(m)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model, n, 0
    import peft
    from peft import get_peft_model
    c = model.config
    prepended = 0
    if m == "lora":
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                              task_type="CAUSAL_LM",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    elif m == "ia3":
        cfg = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"])
    elif m == "beft":
        cfg = peft.BeftConfig(task_type="CAUSAL_LM", target_modules=["v_proj"])
    elif m == "ln_tuning":
        cfg = peft.LNTuningConfig(task_type="CAUSAL_LM",
                                  target_modules=["input_layernorm", "post_attention_layernorm", "norm"])
    elif m == "prompt_tuning":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt)
        prepended = nvt
    elif m == "p_tuning":
        cfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt,
                                       encoder_hidden_size=c.hidden_size)
        prepended = nvt
    elif m == "prefix_tuning":
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt)
    else:
        raise SystemExit(f"unknown method {m}")
    model = get_peft_model(model, cfg)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, n, prepended


if __name__ == "__main__":
    main()
