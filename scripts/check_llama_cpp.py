"""lorafuse's GGUF exports checked by llama.cpp itself (through llama-cpp-python).

For each adapter (a random LoRA and rsLoRA written here in PEFT's layout, and VeRA, AdaLoRA
with pruned ranks and DoRA trained by `lorafuse finetune`), `lorafuse logits --adapter` gives
the reference; llama.cpp runs the same token ids with
  * the base GGUF (Q4_1) and the exported adapter (`lorafuse export --to gguf-lora`),
  * an F32 copy of the base (`lorafuse merge --to gguf --dtype f32` of an all-zero adapter)
    and the exported adapter,
  * the merged model (`lorafuse merge --to gguf`) in F32, F16 and Q8_0,
and the last-position logits are compared. llama.cpp's own precision is the gap between its
logits and lorafuse's for the base model itself (Q4_1: it quantizes activations to 8 bits for
those products; F32: the order of its f32 sums), printed first; the adapter's effect (how far
its logits move from the base's) is printed beside every gap, so that agreement means
something.

  usage: python scripts/check_llama_cpp.py --lorafuse target/release/lorafuse --model M.gguf
         --work DIR [--json OUT.json]
Exits non-zero when a bound below is not met. Run by scripts/test-llama-cpp.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint. Once upon a time, in a quiet town",
]


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return p.stdout


def model_shapes(model: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    import gguf

    r = gguf.GGUFReader(str(model))
    layers = int(r.fields["llama.block_count"].contents())
    d = int(r.fields["llama.embedding_length"].contents())
    ff = int(r.fields["llama.feed_forward_length"].contents())
    heads = int(r.fields["llama.attention.head_count"].contents())
    kv = int(r.fields["llama.attention.head_count_kv"].contents())
    hd = d // heads
    shapes = {  # (out, in)
        "q_proj": (heads * hd, d),
        "k_proj": (kv * hd, d),
        "v_proj": (kv * hd, d),
        "o_proj": (d, heads * hd),
        "gate_proj": (ff, d),
        "up_proj": (ff, d),
        "down_proj": (d, ff),
    }
    return layers, shapes


def write_lora(dir: Path, model: Path, r: int, alpha: float, rslora: bool, seed: int, b_std: float, targets: list[str] = PROJ) -> Path:
    """A PEFT LoRA adapter folder with random A (kaiming-uniform range) and random B on `targets`."""
    layers, shapes = model_shapes(model)
    rng = np.random.default_rng(seed)
    t = {}
    for l in range(layers):
        for p in targets:
            out, inp = shapes[p]
            group = "self_attn" if p in PROJ[:4] else "mlp"
            key = f"base_model.model.model.layers.{l}.{group}.{p}"
            bound = 1.0 / math.sqrt(inp)
            t[f"{key}.lora_A.weight"] = rng.uniform(-bound, bound, (r, inp)).astype(np.float32)
            t[f"{key}.lora_B.weight"] = (rng.standard_normal((out, r)) * b_std).astype(np.float32)
    dir.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dir / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": model.name,
    }
    (dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return dir


def ours(lf: str, model: Path, adapter: Path | None, text: str, out: Path) -> tuple[list[int], np.ndarray]:
    cmd = [lf, "logits", "--device", "cpu", "--model", str(model), "--text", text, "--out", str(out)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    run(cmd)
    d = load_file(str(out))
    return [int(i) for i in d["input_ids"]], d["logits"].astype(np.float64)


def llama_logits(model: Path, lora: Path | None, ids: list[int]) -> np.ndarray:
    import llama_cpp

    kw = dict(model_path=str(model), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0)
    if lora is not None:
        kw["lora_path"] = str(lora)
    llm = llama_cpp.Llama(**kw)
    llm.eval(ids)
    out = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    llm.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lorafuse", required=True)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    lf, model, w = a.lorafuse, a.model, a.work
    w.mkdir(parents=True, exist_ok=True)

    # An F32 copy of the base: the merge of an all-zero adapter (W0 + 0).
    zero = write_lora(w / "zero", model, 1, 1.0, False, 0, 0.0)
    base32 = w / "base-f32.gguf"
    run([lf, "merge", "--model", str(model), "--adapter", str(zero), "--to", "gguf", "--dtype", "f32", "--out", str(base32)])

    adapters: dict[str, Path] = {
        "lora r8 a16": write_lora(w / "lora", model, 8, 16.0, False, a.seed, 0.02),
        "rslora r16 a8": write_lora(w / "rslora", model, 16, 8.0, True, a.seed + 1, 0.02),
    }
    # one projection at a time: where llama.cpp's application and lorafuse's part ways
    for i, p in enumerate(PROJ):
        adapters[f"lora {p} only"] = write_lora(w / f"only-{p}", model, 8, 16.0, False, a.seed + 10 + i, 0.02, [p])
    data = Path(__file__).resolve().parent.parent / "data" / "chatterbot_chat_en.jsonl"
    common = ["--steps", "10", "--batch-size", "4", "--warmup-steps", "1", "--no-eval", "--device", "cpu", "--model", str(model)]
    if data.exists():
        common += ["--data", str(data)]
    trained = {
        "vera r64 (trained)": ["--method", "vera", "--r", "64", "--lr", "5e-2"],
        "adalora pruned (trained)": ["--method", "adalora", "--init-r", "8", "--target-r", "4", "--tinit", "2", "--tfinal", "2", "--delta-t", "2", "--lr", "5e-2"],
        "dora r8 (trained)": ["--method", "dora", "--lr", "2e-2"],
    }
    for name, flags in trained.items():
        out = w / name.split()[0]
        run([lf, "finetune", *flags, *common, "--out", str(out)])
        adapters[name] = out

    rows = []
    llama_base: dict[tuple[str, int], np.ndarray] = {}
    ref: dict[tuple[str | None, int], tuple[list[int], np.ndarray]] = {}
    for ti, text in enumerate(TEXTS):
        ref[(None, ti)] = ours(lf, model, None, text, w / f"ours-base-{ti}.safetensors")
        ids, o = ref[(None, ti)]
        for label, m in [("base Q4_1", model), ("base F32 copy", base32)]:
            l = llama_logits(m, None, ids)
            llama_base[(label, ti)] = l
            rows.append(dict(adapter="(none)", run=label, text=ti, tokens=len(ids), effect=0.0, gap=float(np.abs(l - o).max()), effect_gap=None, argmax_same=bool(l.argmax() == o.argmax())))

    failures = []
    for name, ad in adapters.items():
        files: dict[str, Path] = {}
        if not name.startswith("dora"):
            g = w / f"{ad.name}.lora.gguf"
            run([lf, "export", "--model", str(model), "--adapter", str(ad), "--to", "gguf-lora", "--out", str(g)])
            files["adapter on Q4_1 base"] = g
            files["adapter on F32 base"] = g
        else:
            p = subprocess.run([lf, "export", "--model", str(model), "--adapter", str(ad), "--out", str(w / "dora.gguf")], capture_output=True, text=True)
            if p.returncode == 0 or "merge" not in p.stderr:
                failures.append(f"export of DoRA was not refused naming merge: {p.stderr}")
        for dt in ["f32", "f16", "q8_0"]:
            mg = w / f"{ad.name}.merged.{dt}.gguf"
            run([lf, "merge", "--model", str(model), "--adapter", str(ad), "--to", "gguf", "--dtype", dt, "--out", str(mg)])
            files[f"merged {dt}"] = mg
        for ti, text in enumerate(TEXTS):
            ids, o = ours(lf, model, ad, text, w / f"ours-{ad.name}-{ti}.safetensors")
            assert ids == ref[(None, ti)][0]
            ob = ref[(None, ti)][1]
            effect = float(np.abs(o - ob).max())
            for label, f in files.items():
                if label == "adapter on Q4_1 base":
                    l = llama_logits(model, f, ids)
                elif label == "adapter on F32 base":
                    l = llama_logits(base32, f, ids)
                else:
                    l = llama_logits(f, None, ids)
                # the adapter's effect as llama.cpp applies it, against lorafuse's (on the base
                # llama.cpp ran it over: the base's own gap cancels)
                lb = llama_base[("base Q4_1" if label == "adapter on Q4_1 base" else "base F32 copy", ti)]
                eg = float(np.abs((l - lb) - (o - ob)).max()) if label.startswith("adapter") else None
                rows.append(dict(adapter=name, run=label, text=ti, tokens=len(ids), effect=effect, gap=float(np.abs(l - o).max()), effect_gap=eg, argmax_same=bool(l.argmax() == o.argmax())))

    # llama.cpp's own precision on this model: its gap to lorafuse on the base alone.
    prec = {lab: max(r["gap"] for r in rows if r["adapter"] == "(none)" and r["run"] == lab) for lab in ["base Q4_1", "base F32 copy"]}
    print("| adapter | llama.cpp run | text | tokens | adapter effect | gap to lorafuse | gap of the effect | same argmax |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        eg = "" if r["effect_gap"] is None else f"{r['effect_gap']:.4f}"
        print(f"| {r['adapter']} | {r['run']} | {r['text']} | {r['tokens']} | {r['effect']:.3f} | {r['gap']:.4f} | {eg} | {r['argmax_same']} |")
    print("\n(max abs over the vocabulary of the last position's logits; effect: lorafuse's adapter")
    print("logits minus its base logits; gap of the effect: llama.cpp's adapter minus base against that)")
    print(f"\nllama.cpp's own precision (gap on the base model): Q4_1 {prec['base Q4_1']:.4f}, F32 {prec['base F32 copy']:.5f}")

    # Bounds: an F32 path must agree to a few times llama.cpp's F32 precision on the base and
    # well inside the adapter's effect; over the Q4_1 base, the adapter's effect must agree to
    # llama.cpp's Q4_1 precision (loosely, see there); the F16/Q8_0 merges to their rounding (loosely).
    for r in rows:
        if r["adapter"] == "(none)":
            continue
        run_, gap, eff = r["run"], r["gap"], r["effect"]
        if run_ in ("adapter on F32 base", "merged f32"):
            bound = max(3 * prec["base F32 copy"], 1e-3)
            if not (eff > 5 * gap):
                failures.append(f"{r['adapter']} / {run_}: effect {eff:.4g} is not well above the gap {gap:.4g}")
        elif run_ == "adapter on Q4_1 base":
            # llama.cpp multiplies Q4_1 weights by activations rounded to 8 bits (Q8_1): its
            # gap to lorafuse's f32 activations is 0.6 on the base alone and does not cancel
            # in the effect, so this run is held to 3x that and the same argmax only
            bound = 3 * prec["base Q4_1"]
            if not r["argmax_same"]:
                failures.append(f"{r['adapter']} / {run_} / text {r['text']}: another argmax")
        else:
            bound = max(0.25 * eff, 4 * prec["base Q4_1"])
        if not (gap <= bound):
            failures.append(f"{r['adapter']} / {run_} / text {r['text']}: gap {gap:.4g} > bound {bound:.4g}")
    if a.json:
        a.json.write_text(json.dumps(dict(rows=rows, precision=prec, failures=failures), indent=2))
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    print("\nall bounds met" if not failures else f"\n{len(failures)} bound(s) missed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
