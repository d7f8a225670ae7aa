#!/usr/bin/env python3
"""PEFT's mixed-batch inference on the batch `lorafuse bench --mixed` wrote, timed the same way.

    PEERS/venv/bin/python scripts/peft_multi_bench.py --dir target/bench-multi \
        [--model SmolLM2-135M-Instruct.Q4_1.gguf] [--threads 2] [--min-time 1]

Loads the fp32 transformers model from the GGUF, the K adapters lorafuse saved in DIR/a0, a1, ...
(PeftModel.from_pretrained + load_adapter) and DIR/batch.json (input_ids [N][T], adapter_index [N]);
then times, each to its median over at least 5 interleaved runs under torch.no_grad:
  prefill     model(input_ids) on the base, on one adapter (set_adapter a0), and mixed
              (model(input_ids, adapter_names=[a_i per row]), PEFT's mixed batch);
  decode step one token per sequence after a prefill (past_key_values), the same three ways.
Writes DIR/peft.json with the rows as `lorafuse bench --mixed` writes them (phase, case, ms, reps).
Also checks that PEFT's mixed logits at each row's last token equal each row run on its own adapter
(the semantics lorafuse's mixed batch matches), within 1e-4.
"""
import argparse
import json
import os
import statistics
import sys
import time

DEFAULT_MODEL = os.environ.get("LORAFUSE_MODEL") or os.path.join(
    os.environ.get("LORAFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorafuse"),
    "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="target/bench-multi")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    a = ap.parse_args()
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        sys.exit(f"torch/peft/transformers not importable ({e}); see scripts/setup-peers.sh")
    torch.set_num_threads(a.threads)
    batch = json.load(open(os.path.join(a.dir, "batch.json")))
    names = batch["adapters"]
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    per_row = [names[i] for i in batch["adapter_index"]]
    d, f = os.path.split(os.path.abspath(a.model))
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(a.dir, names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(os.path.join(a.dir, n), adapter_name=n)
    model.eval()
    n_seqs = ids.shape[0]
    nxt = torch.tensor([[(s * 7) % base.config.vocab_size] for s in range(n_seqs)])

    def fwd(how, x, past=None):
        kw = {"use_cache": True, "past_key_values": past}
        if how == "base model":
            with model.disable_adapter():
                return model(input_ids=x, **kw)
        if how == "one adapter":
            model.set_adapter(names[0])
            return model(input_ids=x, **kw)
        return model(input_ids=x, adapter_names=per_row, **kw)

    def run(how, decode):
        with torch.no_grad():
            if decode:
                out = fwd(how, ids)
                t = time.perf_counter()
                fwd(how, nxt, out.past_key_values)
                return time.perf_counter() - t
            t = time.perf_counter()
            fwd(how, ids)
            return time.perf_counter() - t

    # The semantics: mixed row r = row r alone on its adapter.
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=per_row).logits[:, -1]
        for r, n in enumerate(per_row):
            model.set_adapter(n)
            alone = model(input_ids=ids[r:r + 1]).logits[0, -1]
            err = (mixed[r] - alone).abs().max().item()
            if err > 1e-4:
                sys.exit(f"PEFT's mixed row {r} differs from the row alone by {err}")
    cases = ["base model", "one adapter", "mixed"]
    rows = []
    for decode in (False, True):
        times = {c: [] for c in cases}
        for c in cases:
            run(c, decode)
        t0 = time.perf_counter()
        while len(times[cases[0]]) < 5 or time.perf_counter() - t0 < a.min_time * len(cases):
            for c in cases:
                times[c].append(run(c, decode))
        for c in cases:
            rows.append({"phase": "decode step" if decode else "prefill", "case": c,
                         "ms": 1e3 * statistics.median(times[c]), "reps": len(times[c])})
    print(f"PEFT {__import__('peft').__version__}, torch {torch.__version__}, {a.threads} threads")
    for r in rows:
        print(f"{r['phase']:<12} {r['case']:<12} {r['ms']:>10.2f} {r['reps']:>5}")
    json.dump({"peft": __import__("peft").__version__, "torch": torch.__version__,
               "threads": a.threads, "rows": rows}, open(os.path.join(a.dir, "peft.json"), "w"),
              indent=1)


if __name__ == "__main__":
    main()
