#!/usr/bin/env bash
# The CUDA backend's GPU check, in two halves.
#
#   bash scripts/gpu-check.sh pack   # HERE (no GPU needed): builds the CUDA test and benchmark
#                                    # binaries in release mode and copies them, stripped, to
#                                    # .gpu/bin/ (git-ignored).
#   bash scripts/gpu-check.sh run    # ON THE GPU MACHINE, in one device call that carries .gpu
#                                    # (and .whl with the bitsandbytes wheel, if wanted). Builds
#                                    # nothing. Uses the machine's own CUDA (libnvrtc, libcublas,
#                                    # headers, ptxas under /usr/local/cuda), not the pip wheels.
#
# `run` does, writing every result under $OUT (or target/gpu-check when OUT is unset):
#   1. nvidia-smi                                             -> nvidia-smi.txt
#   2. the NVRTC/ptxas compile test, LORAFUSE_REQUIRE=nvrtc   -> compile.log
#   3. every CUDA parity test, LORAFUSE_REQUIRE=cuda          -> tests.log
#   4. compute-sanitizer memcheck and racecheck on the kernel tests -> memcheck.log, racecheck.log
#   5. our benchmarks (tests/cuda_bench.rs)                  -> ours.json
#   6. torch / PEFT / bitsandbytes on the same cases, same run -> peers.json
#   7. a dated section (device, ours, peer, ratio, fraction of copy bandwidth), appended to
#      BENCHMARKS.md here and copied to                       -> benchmarks-section.md
# and exits non-zero when a test or sanitizer run failed.
#
# Device call (from a session with a lent GPU):
#   run(command="bash scripts/gpu-check.sh run", carry=[".gpu", ".whl"], timeout_s=600)
# then append $files_at/benchmarks-section.md to BENCHMARKS.md in the checkout and commit it.
#
# The WGSL backend on the same GPU through Vulkan, in a second call (the carry limit is 64 MiB):
#   bash scripts/gpu-check.sh pack-wgpu   # HERE: the wgpu test binaries and `lorafuse` into
#                                         # .gpu-wgpu/bin, the Vulkan loader debs into .gl/
#   run(command="bash scripts/gpu-check.sh run-wgpu", carry=[".gpu-wgpu", ".gl"], timeout_s=600)
# `run-wgpu` unpacks the loader, runs every wgpu test with LORAFUSE_REQUIRE=wgpu
# (wgpu-tests.log), then `lorafuse bench` on wgpu and on cuda in the same run and writes the
# ratios issue 5 asks for (LoRA fwd+bwd, NF4 dequant-matmul, tiled matmul vs cuBLAS SGEMM) to
# wgpu-section.md, appended to BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"

if [ "$mode" = pack ]; then
  set -e
  mkdir -p .gpu/bin
  cargo test --release --no-run --test cuda_backend --test cuda_compile --test cuda_bench \
    --message-format=json-render-diagnostics >.gpu/build.json
  python3 - <<'PY'
import json, shutil, os
for line in open(".gpu/build.json"):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("cuda_"):
        dst = os.path.join(".gpu/bin", m["target"]["name"])
        shutil.copy(m["executable"], dst)
        print("packed", dst)
PY
  for f in .gpu/bin/*; do strip "$f" 2>/dev/null || true; done
  rm -f .gpu/build.json
  du -sh .gpu
  exit 0
fi
if [ "$mode" = pack-wgpu ]; then
  set -e
  mkdir -p .gpu-wgpu/bin
  cargo build --release --bin lorafuse
  cp target/release/lorafuse .gpu-wgpu/bin/
  cargo test --release --no-run --test wgpu_linear --test wgpu_ops --test wgpu_adapters \
    --test wgpu_nf4 --test wgpu_finetune --message-format=json-render-diagnostics >.gpu-wgpu/build.json
  python3 - <<'PY'
import json, shutil, os
for line in open(".gpu-wgpu/build.json"):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("wgpu_"):
        dst = os.path.join(".gpu-wgpu/bin", m["target"]["name"])
        shutil.copy(m["executable"], dst)
        print("packed", dst)
PY
  for f in .gpu-wgpu/bin/*; do strip "$f" 2>/dev/null || true; done
  rm -f .gpu-wgpu/build.json
  if ! ls .gl/*.deb >/dev/null 2>&1; then
    # The Vulkan/EGL loaders for the device image (its NVIDIA driver brings the ICD).
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086
    apt-get $o update -qq
    # shellcheck disable=SC2086
    (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  fi
  du -sh .gpu-wgpu .gl
  exit 0
fi

if [ "$mode" = run-wgpu ]; then
  out="${OUT:-target/gpu-check}"
  mkdir -p "$out"
  status=0
  for f in .gl/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
  ldconfig 2>/dev/null || true
  for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json; do
    if [ -z "${VK_DRIVER_FILES:-}" ] && [ -e "$icd" ]; then export VK_DRIVER_FILES="$icd"; fi
  done
  export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
  cuda="${CUDA_HOME:-/usr/local/cuda}"
  export LD_LIBRARY_PATH="$cuda/lib64:$cuda/lib:${LD_LIBRARY_PATH:-}"
  export LORAFUSE_CUDA_INCLUDE="${LORAFUSE_CUDA_INCLUDE:-$cuda/include}"
  export LORAFUSE_REPO_DIR="$PWD"
  bin=.gpu-wgpu/bin
  [ -x "$bin/lorafuse" ] || { echo "missing $bin: run 'bash scripts/gpu-check.sh pack-wgpu' here first" >&2; exit 2; }
  for t in "$bin"/wgpu_*; do
    echo "== $(basename "$t")" >>"$out/wgpu-tests.log"
    LORAFUSE_REQUIRE=wgpu "$t" --nocapture >>"$out/wgpu-tests.log" 2>&1 || status=1
  done
  grep -E "^test result|wgpu adapter" "$out/wgpu-tests.log" >&2 || true
  for dev in wgpu cuda; do
    "$bin/lorafuse" bench --device "$dev" --cases "${LORAFUSE_BENCH_CASES:-default}" --min-time 0.5 --json "$out/bench-$dev.json" \
      >"$out/bench-$dev.txt" 2>&1 || status=1
    head -2 "$out/bench-$dev.txt" >&2
  done
  python3 - "$out" <<'PY' || status=1
import json, sys, datetime, os, re
out = sys.argv[1]
def load(dev):
    p = os.path.join(out, f"bench-{dev}.json")
    return {r["case"]: r for r in json.load(open(p))} if os.path.exists(p) else {}
def peak(dev):
    p = os.path.join(out, f"bench-{dev}.txt")
    m = re.search(r"SGEMM peak \(linear 2048\^3\) ([0-9.]+) GFLOP/s", open(p).read()) if os.path.exists(p) else None
    return float(m.group(1)) if m else None
w, c = load("wgpu"), load("cuda")
dev = open(os.path.join(out, "nvidia-smi.txt")).read().split("\n")[0] if os.path.exists(os.path.join(out, "nvidia-smi.txt")) else "GPU"
lines = [f"\n## WGSL backend (Vulkan) vs CUDA backend, {datetime.date.today().isoformat()}, same GPU, same run\n",
         "f32 storage on both; `lorafuse bench` medians; ratio = CUDA time / wgpu time (issue 5 bars: "
         "LoRA fwd+bwd >= 0.5, NF4 dequant-matmul >= 0.6 of CUDA throughput, tiled matmul >= 0.4 of cuBLAS).\n",
         "| case | wgpu ms | cuda ms | cuda/wgpu |", "| --- | ---: | ---: | ---: |"]
for name, r in w.items():
    if name in c:
        lines.append(f"| {name} | {1e3 * r['ours_s']:.3f} | {1e3 * c[name]['ours_s']:.3f} | {c[name]['ours_s'] / r['ours_s']:.2f} |")
pw, pc = peak("wgpu"), peak("cuda")
if pw and pc:
    lines.append(f"\nSGEMM 2048^3 through `linear`: wgpu tiled matmul {pw:.0f} GFLOP/s, cuBLAS {pc:.0f} GFLOP/s ({100 * pw / pc:.0f}%).")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "wgpu-section.md"), "w").write(text)
with open("BENCHMARKS.md", "a") as f:
    f.write(text)
print(text)
PY
  echo "gpu-check run-wgpu status: $status (0 = all passed)" | tee -a "$out/wgpu-tests.log"
  exit "$status"
fi

[ "$mode" = run ] || { echo "usage: $0 pack|run|pack-wgpu|run-wgpu" >&2; exit 2; }

out="${OUT:-target/gpu-check}"
mkdir -p "$out"
status=0
note() { echo "== $*" | tee -a "$out/tests.log" >&2; }

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
cuda="${CUDA_HOME:-/usr/local/cuda}"
export LD_LIBRARY_PATH="$cuda/lib64:$cuda/lib:${LD_LIBRARY_PATH:-}"
export LORAFUSE_CUDA_INCLUDE="${LORAFUSE_CUDA_INCLUDE:-$cuda/include}"
export LORAFUSE_PTXAS="${LORAFUSE_PTXAS:-$cuda/bin/ptxas}"
export PATH="$cuda/bin:$PATH"
export LORAFUSE_CACHE="${LORAFUSE_CACHE:-/tmp/lorafuse-cache}"
export LORAFUSE_REPO_DIR="$PWD"
bin=.gpu/bin
for b in cuda_compile cuda_backend cuda_bench; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b: run 'bash scripts/gpu-check.sh pack' here first and carry .gpu" >&2; exit 2; }
done

note "compile test (NVRTC + ptxas sm_80/sm_90)"
LORAFUSE_REQUIRE=nvrtc "$bin/cuda_compile" --nocapture >"$out/compile.log" 2>&1 || status=1
tail -3 "$out/compile.log" >&2

note "CUDA parity tests, LORAFUSE_REQUIRE=cuda"
LORAFUSE_REQUIRE=cuda "$bin/cuda_backend" --test-threads=1 >>"$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log" >&2

if command -v compute-sanitizer >/dev/null; then
  # The kernel tests under both tools (f32/f16/bf16 each; the sanitizers slow kernels 10-100x,
  # so the biggest families get the most time).
  for tool in memcheck racecheck; do
    note "compute-sanitizer --tool $tool"
    timeout 200 compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 \
      "$bin/cuda_backend" --test-threads=1 lora dora vera adalora nf4 model_ops attention memory \
      >"$out/$tool.log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then status=1; fi
    [ "$rc" -eq 124 ] && echo "(stopped at 200 s; see the log for the tests it finished)" >>"$out/$tool.log"
    tail -4 "$out/$tool.log" >&2
  done
else
  echo "compute-sanitizer not found" | tee "$out/memcheck.log" "$out/racecheck.log"
  status=1
fi

note "benchmarks: ours"
LORAFUSE_REQUIRE=cuda LORAFUSE_BENCH_OUT="$out/ours.json" "$bin/cuda_bench" --ignored --nocapture \
  >>"$out/tests.log" 2>&1 || status=1

note "benchmarks: torch / PEFT / bitsandbytes, same run"
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
PYTHONUNBUFFERED=1 python3 - "$out/peers.json" >>"$out/tests.log" 2>&1 <<'PY' || status=1
import json, sys, torch
dev = "cuda"
res = {}
def bench(f, n_min=5):
    for _ in range(3): f()
    torch.cuda.synchronize()
    ts = []
    import time
    t0 = time.perf_counter()
    while len(ts) < 200 and (len(ts) < n_min or time.perf_counter() - t0 < 0.5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]
bf = torch.bfloat16
big = torch.empty(1 << 29, dtype=bf, device=dev)
res["copy_1GiB"] = ("torch copy_", bench(lambda: big.clone()))
try:
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit, dequantize_4bit
    for out_, in_ in [(4096, 4096), (14336, 4096)]:
        W = (torch.randn(out_, in_, device=dev) * 0.05).to(bf)
        qW, st = quantize_4bit(W, quant_type="nf4", compress_statistics=True, blocksize=64)
        res[f"nf4_dequantize_{out_}x{in_}"] = ("bnb dequantize_4bit", bench(lambda: dequantize_4bit(qW, st)))
        for t in [1, 16, 64]:
            x = torch.randn(t, in_, device=dev, dtype=bf)
            peer = "bnb gemv_4bit" if t == 1 else "bnb matmul_4bit"
            res[f"nf4_linear_t{t}_{out_}x{in_}"] = (peer, bench(lambda: bnb.matmul_4bit(x, qW.t(), quant_state=st)))
except Exception as e:  # bitsandbytes missing or failing: say so, keep the rest
    print("bitsandbytes unavailable:", e)
try:
    from peft import LoraConfig, get_peft_model
    for dora in [False, True]:
        base = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).to(dev, bf)
        m = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["0"], lora_dropout=0.0, use_dora=dora))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        for t in [256, 4096]:
            x = torch.randn(t, 4096, device=dev, dtype=bf, requires_grad=True)
            dy = torch.randn(t, 4096, device=dev, dtype=bf)
            def step():
                m.zero_grad(set_to_none=True); x.grad = None
                m(x).backward(dy)
            name = ("dora" if dora else "lora") + f"_fwd_bwd_t{t}_4096x4096_r16"
            res[name] = ("PEFT " + ("DoRA" if dora else "LoRA"), bench(step))
except Exception as e:
    print("peft unavailable:", e)
json.dump({k: {"peer": v[0], "ms": v[1]} for k, v in res.items()}, open(sys.argv[1], "w"), indent=1)
print("peers:", {k: round(v[1], 4) for k, v in res.items()})
PY

note "BENCHMARKS.md section"
python3 - "$out/ours.json" "$out/peers.json" "$out/benchmarks-section.md" <<'PY' || status=1
import json, sys, datetime, os
if not os.path.exists(sys.argv[1]):
    sys.exit("no ours.json (the benchmark binary failed): BENCHMARKS.md left unchanged")
ours = json.load(open(sys.argv[1]))
peers = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else {}
lines = [f"\n## CUDA backend vs torch / PEFT / bitsandbytes, {datetime.date.today().isoformat()}, {ours['device']}\n",
         "Same run, same device (scripts/gpu-check.sh); bf16 storage, f32 accumulation; medians. "
         f"Measured device-to-device copy bandwidth {ours['copy_gbps']:.0f} GB/s (bytes read + written). "
         "Ratio = peer time / our time (> 1: we are faster). %copy = the bytes the kernel must move / "
         "time, as a fraction of the copy bandwidth.\n",
         "| case | ours ms | peer | peer ms | peer/ours | %copy |", "| --- | ---: | --- | ---: | ---: | ---: |"]
own = {c["name"]: c for c in ours["cases"]}
for c in ours["cases"]:
    p = peers.get(c["name"])
    ratio = f"{p['ms'] / c['ms']:.2f}x" if p else "n/a"
    lines.append(f"| {c['name']} | {c['ms']:.4f} | {p['peer'] if p else 'not measured'} | "
                 f"{p['ms']:.4f} | {ratio} | {100 * c['frac_copy']:.0f}% |" if p else
                 f"| {c['name']} | {c['ms']:.4f} | not measured | | | {100 * c['frac_copy']:.0f}% |")
for t in (256, 4096):
    l, d = own.get(f"lora_fwd_bwd_t{t}_4096x4096_r16"), own.get(f"dora_fwd_bwd_t{t}_4096x4096_r16")
    if l and d:
        lines.append(f"\nDoRA / our LoRA at {t} tokens: {d['ms'] / l['ms']:.2f}x.")
text = "\n".join(lines) + "\n"
open(sys.argv[3], "w").write(text)
with open("BENCHMARKS.md", "a") as f:
    f.write(text)
print(text)
PY
echo "gpu-check status: $status (0 = all passed)" | tee -a "$out/tests.log"
exit "$status"
