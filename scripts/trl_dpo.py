#!/usr/bin/env python3
"""TRL's DPOTrainer on PEFT LoRA with lorafuse's `dpo` recipe, for a same-run comparison.

Runs in the peers venv (scripts/setup-peers.sh, plus `pip install --no-deps trl==1.16.0` and
`pip install datasets pandas pyarrow jinja2`), CPU, fp32:

    .peers/venv/bin/python scripts/trl_dpo.py --out trl_dpo.json

The recipe is `lorafuse dpo --no-eval`'s defaults except the learning rate (--lr, the same on both
sides): SmolLM2-135M-Instruct from the GGUF, `data/chatterbot_pref_en.jsonl` with records
index % 10 == 9 held out (914 train pairs), each pair rendered as the default recipe renders it
(prompt `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`, completion the answer
plus TRL's appended eos `<|im_end|>`), 128 tokens at most; LoRA r 8, alpha 16, dropout 0 on the
seven projections (`torch.manual_seed(--lora-seed)` before the trainer wraps the model); the
sigmoid loss, beta 0.1, the reference the model with the adapter disabled (TRL's default for a
PEFT model); AdamW (0.9, 0.999, 1e-8, no weight decay), no gradient clipping, 5 warmup steps then
linear decay; 8 pairs per step in lorafuse's order (`shuffled_order(914, seed, epoch)`, fed to
the trainer in sequence); 2 threads. Writes each step's loss, TRL's logged rewards and its wall
time to --out.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from lorafuse_order import shuffled_order  # noqa: E402


def main():
    cache = os.environ.get("LORAFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorafuse")
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", default=os.environ.get("LORAFUSE_MODEL")
                    or os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--data", default=os.path.join(REPO, "data", "chatterbot_pref_en.jsonl"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lora-seed", type=int, default=42)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="trl_dpo.json")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import datasets
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    train = [r for i, r in enumerate(records) if i % 10 != 9]
    order, epoch = [], 0
    while len(order) < args.steps * args.batch_size:
        order += shuffled_order(len(train), args.seed, epoch)
        epoch += 1
    rows = [train[i] for i in order[: args.steps * args.batch_size]]
    ds = datasets.Dataset.from_list([
        {
            "prompt": f"<|im_start|>user\n{r['prompt'].strip()}<|im_end|>\n<|im_start|>assistant\n",
            "chosen": r["chosen"].strip(),
            "rejected": r["rejected"].strip(),
        }
        for r in rows
    ])

    model_dir, gguf = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, dtype=torch.float32)
    assert tok.eos_token == "<|im_end|>", tok.eos_token
    # transformers dequantizes a GGUF to f32 tensors on load but keeps its quantizer, which
    # Trainer then refuses to train; the weights are plain f32, so drop the flag.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    steps = []

    class Record(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            steps.append({"step": state.global_step - 1, "seconds": time.perf_counter() - self.t0})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs and steps:
                steps[-1].update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})

    cfg = DPOConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)) or ".", "trl-dpo-tmp"),
        beta=args.beta, loss_type=["sigmoid"], max_length=args.max_len,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=args.warmup,
        max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_grad_norm=0.0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, bf16=False, fp16=False,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                      "down_proj"])
    torch.manual_seed(args.lora_seed)
    trainer = InOrder(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                      callbacks=[Record()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    secs = sorted(s["seconds"] for s in steps)
    out = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__, "datasets": datasets.__version__},
        "args": vars(args),
        "steps": steps,
        "seconds_per_step_median": secs[len(secs) // 2] if secs else None,
        "train_seconds": total,
    }
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"{len(steps)} steps, median {out['seconds_per_step_median']:.3f} s/step; "
          f"first losses {[round(s.get('loss', float('nan')), 4) for s in steps[:3]]}; wrote {args.out}")


if __name__ == "__main__":
    main()
