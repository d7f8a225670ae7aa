#!/usr/bin/env bash
# lorafuse's GPU check: ONE device call (at most 8 minutes) that runs everything that needs the
# NVIDIA GPU, in priority order, each step time-boxed from one budget and each result written
# under $OUT as soon as it exists, so that a call killed at its limit still returns what it
# finished.
#
#   bash scripts/gpu-check.sh pack          # HERE (no GPU needed): builds everything into .gpu/
#   run(command="bash scripts/gpu-check.sh run", carry=[".gpu"], timeout_s=480)
#   bash scripts/gpu-check.sh run STEP...   # only the named steps, in the order below
#   bash scripts/gpu-check.sh run-wgpu      # = run wgpu-tests wgpu-bench wgpu-section: the
#                                           #   second call, when the first one cut them
# Then append $files_at/benchmarks-section.md to BENCHMARKS.md here (nothing is written to the
# GPU machine's copy of the tree, which is thrown away).
#
# `pack` builds, strips and xz-compresses the CUDA test and benchmark binaries, the wgpu test
# binaries and `lorafuse` into .gpu/bins.tar.xz, downloads the Vulkan/EGL loader debs into
# .gpu/deb/ (the image has the NVIDIA driver's ICD but maybe no loader) and bitsandbytes into
# .gpu/whl/ (the image has torch 2.11+cu130, PEFT, transformers and accelerate, but not
# bitsandbytes; its wheel is cut down to the CUDA 13 libraries: 7 of 43 MB). .gpu/ is
# git-ignored and must fit, with the ~5 MiB tree, in the device's 64 MiB carry: pack prints
# its size and fails over GPU_PACK_MAX_MIB (60). `run` builds nothing and installs nothing
# from outside: it unpacks the binaries into $GPU_CHECK_TMP (/tmp/gpu-check), uses the
# machine's CUDA (libnvrtc, libcublas, headers, ptxas under $CUDA_HOME, /usr/local/cuda), its
# python3 for the peers, and unpacks the debs into / only where ldconfig finds no libvulkan.
#
# Steps of `run`, in this order (name: what -> file under $OUT):
#   compile      NVRTC + ptxas of every kernel module, LORAFUSE_REQUIRE=nvrtc         -> cuda.log
#   parity       the CUDA-only tests (tests/cuda_backend.rs), then the generic suite's CUDA
#                instances against the CPU reference (tests/backend_ops.rs: cuda_f32::,
#                cuda_bf16::, cuda_f16::, one dtype after the other), then the additive
#                methods' golden cases (tests/golden_seeds.rs cuda::), LORAFUSE_REQUIRE=cuda
#                                                                                  -> cuda.log
#   bench        our CUDA benchmarks (tests/cuda_bench.rs), bf16        -> ours.json, cuda.log
#   peers        torch / PEFT / bitsandbytes on the same cases, same run -> peers.json, cuda.log
#   section      the dated BENCHMARKS.md section: ours, peer, ratio, %copy of the measured
#                device copy bandwidth                                   -> benchmarks-section.md
#   memcheck     compute-sanitizer memcheck, one run per kernel family (kernels/*.cu: the
#                backend_ops tests of that family, in f32, bf16 and f16), each time-boxed
#                                                                              -> sanitizer.log
#   wgpu-tests   the generic suite's wgpu instances (backend_ops `wgpu`: wgpu::, wgpu_1k::,
#                wgpu_workgroup::), then every wgpu-only test binary, through Vulkan on the
#                same GPU, LORAFUSE_REQUIRE=wgpu                                 -> wgpu.log
#   wgpu-bench   `lorafuse bench --device wgpu`, then `--device cuda` (bandwidth = each
#                backend's device-to-device copy)                        -> devices.json, wgpu.log
#   wgpu-section the wgpu-vs-CUDA table, appended to                     -> benchmarks-section.md
#   racecheck    compute-sanitizer racecheck on the same tests, with what time is left
#                                                                              -> sanitizer.log
# plus steps.txt, rewritten as each step starts and ends (step, ran|cut|failed|skipped,
# seconds, note; a step still `running` there is where a killed call stopped). These are 8
# files: the device returns at most 8.
#
# Time: GPU_CHECK_BUDGET seconds in all (default 470, for a call with timeout_s=480). Each
# step gets min(its cap, what is left); a step that cannot get its minimum is `cut` without
# starting, one stopped at its time box is `cut` and keeps what it wrote. The summary printed
# last says which steps ran, were cut, failed or were skipped. Exit status 1 when a step
# failed (cut and skipped steps do not fail the run).
#
# Knobs: GPU_CHECK_BUDGET; GPU_CHECK_CASES (`lorafuse bench --cases`, default `default`, `small`
# where no NVIDIA GPU is found); GPU_CHECK_MIN_TIME (0.5); GPU_CHECK_TEST_THREADS (parity, 1);
# GPU_CHECK_WGPU_REQUIRE (wgpu); GPU_CHECK_TMP; PEERS_PYTHON (python3); CUDA_HOME; for pack
# GPU_PACK_MAX_MIB, BNB_VERSION (0.50.2), BNB_CUDA_LIBS (cuda130 cuda132).
#
# Order and timings. Measured here, on a 2-core x86 VM with no GPU (Vulkan: lavapipe), other
# builds running beside; each device-side step as the dry run
# `OUT=/tmp/gpucheck-dry bash scripts/gpu-check.sh run` runs it (111 s in all):
#   unpack .gpu/bins.tar.xz          0-1 s
#   compile                         27 s  (NVRTC + ptxas: CPU work, the same there; run with
#                                          `source scripts/cuda-env.sh` first, else it fails
#                                          at once: no libnvrtc)
#   parity, bench, memcheck,         <1 s  each: fail at once (no libcuda, no compute-sanitizer);
#   racecheck                              their GPU time cannot be measured here
#   peers                          1-2 s  skipped (no torch in python3); with a torch venv
#                                          (PEERS_PYTHON) 2 s to fail "sees no CUDA device",
#                                          11 s for a cold `import torch, peft, bitsandbytes`
#   wgpu-tests                   47-63 s  all 7 binaries on lavapipe, every test run, none skipped
#   wgpu-bench                   63-101 s `lorafuse bench --device wgpu --cases small` on lavapipe,
#                                          nearly all of it the 2048^3 SGEMM peak (1-2 GFLOP/s
#                                          there); `--device cpu --cases small` takes 2 s
# Expected on the H200 (leads until the first call's steps.txt replaces them): compile ~20 s,
# parity ~60 s (NVRTC once into the PTX cache, then small kernels; CPU reference on 16 cores),
# bench ~30 s (23 cases x <= 0.5 s, the NF4 quantization of 14336x4096 on the host), peers
# ~50 s (imports, CUDA start, 23 cases x <= 0.5 s), memcheck 150 s (its cap: 7 tests x ~21 s),
# wgpu-tests ~40 s (well under lavapipe's), wgpu-bench ~60 s (2 x 28 default cases x <= 0.5 s
# plus their host-side set-up): ~410 s of 470, the rest for racecheck.
# Why this order: correctness first (a wrong kernel makes every timing moot) and cheap; the
# benchmarks next, on an idle GPU with the PTX cache warm from the parity run, before anything
# slow can eat their time (they are what BENCHMARKS.md reports); memcheck third, because it is
# slow (10-100x per kernel) and is cut to what its box allows without losing earlier results;
# wgpu last, since a second call (`run-wgpu`) can redo it alone from the same pack; racecheck
# only with what is left.
set -uo pipefail
cd "$(dirname "$0")/.."
self="$PWD/scripts/gpu-check.sh"
mode="${1:-run}"
[ "$#" -gt 0 ] && shift

order=(compile parity bench peers section memcheck wgpu-tests wgpu-bench wgpu-section racecheck)
declare -A cap=([compile]=60 [parity]=150 [bench]=90 [peers]=120 [section]=20 [memcheck]=150
  [wgpu-tests]=150 [wgpu-bench]=150 [wgpu-section]=20 [racecheck]=120)
declare -A least=([compile]=10 [parity]=30 [bench]=20 [peers]=30 [section]=3 [memcheck]=30
  [wgpu-tests]=30 [wgpu-bench]=30 [wgpu-section]=3 [racecheck]=30)
declare -A logfile=([compile]=cuda.log [parity]=cuda.log [bench]=cuda.log [peers]=cuda.log
  [section]=cuda.log [memcheck]=sanitizer.log [wgpu-tests]=wgpu.log [wgpu-bench]=wgpu.log
  [wgpu-section]=wgpu.log [racecheck]=sanitizer.log)
# backend_ops (the generic suite, tests/backend_ops.rs + tests/ops/) serves the parity,
# memcheck and wgpu-tests steps; it is packed with the CUDA binaries so that it is never dropped.
cuda_tests=(backend_ops cuda_backend cuda_bench cuda_compile golden_seeds golden_multi multi_train)
# The wgpu-only test binaries, in order of priority: pack drops from the end if the carry would
# not fit.
wgpu_tests=(wgpu_device wgpu_f16 wgpu_finetune)
# The generic suite's instances per step: its test names are `instance::family::check`.
parity_instances=(cuda_f32 cuda_bf16 cuda_f16)
wgpu_suite_filter=wgpu # wgpu::, wgpu_1k::, wgpu_workgroup::
# One sanitizer run per kernel family (kernels/*.cu): `family.cu:` and the backend_ops checks
# that launch its kernels, each run in every instance of san_instances; then two more runs
# over the most complex kernels of their family (while the step's time lasts).
san_instances=(cuda_f32 cuda_bf16 cuda_f16)
san_tests=(
  "optim.cu:memory::elementwise adamw::adamw"
  "lora.cu:dense::linear lowrank::lora"
  "dora.cu:lowrank::dora"
  "vera.cu:lowrank::vera"
  "adalora.cu:lowrank::adalora adalora_alloc::update_and_scores adalora_alloc::kthvalue_and_masks adalora_alloc::orth_reg"
  "nf4.cu:nf4::dequantize nf4::linear"
  "model.cu:memory::gather_scatter model::rmsnorm model::rope model::swiglu model::cross_entropy model::cross_entropy_stats"
  "pointwise.cu:pointwise::mul_vector pointwise::sum_product pointwise::activation pointwise::softmax"
  "multi_lora.cu:multi::mixed"
)
san_extra=("attention:attention::attention attention::cached" "allocator:adalora_alloc::device_allocator")

# ------------------------------------------------------------------------------------------
# pack (here)
# ------------------------------------------------------------------------------------------
pack() {
  set -e
  local stage=target/gpu-pack max_mib="${GPU_PACK_MAX_MIB:-60}"
  local bnb_version="${BNB_VERSION:-0.50.2}" bnb_keep="${BNB_CUDA_LIBS:-cuda130 cuda132}"
  rm -rf "$stage" .gpu/bin .gpu/bins.tar.xz
  mkdir -p "$stage/bin" .gpu/deb .gpu/whl
  local args=() t
  for t in "${cuda_tests[@]}" "${wgpu_tests[@]}"; do args+=(--test "$t"); done
  cargo build --release --bin lorafuse
  cargo test --release --no-run "${args[@]}" --message-format=json-render-diagnostics \
    >"$stage/build.json"
  python3 - "$stage" "${cuda_tests[@]}" "${wgpu_tests[@]}" <<'PY'
import json, os, shutil, sys
stage, names = sys.argv[1], set(sys.argv[2:])
for line in open(os.path.join(stage, "build.json")):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in names:
        shutil.copy(m["executable"], os.path.join(stage, "bin", m["target"]["name"]))
PY
  cp target/release/lorafuse "$stage/bin/"
  strip "$stage"/bin/*
  local members=(lorafuse "${cuda_tests[@]}" "${wgpu_tests[@]}")
  for t in "${members[@]}"; do [ -x "$stage/bin/$t" ] || { echo "pack: $t was not built" >&2; exit 1; }; done

  if ! ls .gpu/deb/*.deb >/dev/null 2>&1; then
    # The Vulkan/EGL loaders for the device image (its NVIDIA driver brings the ICD).
    mkdir -p /tmp/amd64/partial
    local o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    if apt-get "${o[@]}" update -qq; then
      (cd .gpu/deb && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2) \
        || echo "pack: apt-get download failed: the wgpu steps need a libvulkan on the GPU machine" >&2
    else
      echo "pack: apt-get update failed: no loader debs" >&2
    fi
  fi

  if ! ls .gpu/whl/bitsandbytes-"$bnb_version"-*.whl >/dev/null 2>&1; then
    rm -f .gpu/whl/bitsandbytes-*.whl
    mkdir -p "$stage/whl"
    if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$stage/whl" "bitsandbytes==$bnb_version"; then
      # The same wheel with only the CUDA libraries the image's torch loads (and the CPU one):
      # files and RECORD lines of the other CUDA, ROCm and XPU builds left out.
      python3 - "$stage"/whl/bitsandbytes-*.whl .gpu/whl "$bnb_keep" <<'PY'
import os, re, sys, zipfile
src, dst_dir, keep = sys.argv[1], sys.argv[2], sys.argv[3].split()
def wanted(name):
    m = re.search(r"libbitsandbytes_([a-z0-9]+)\.(so|dll|dylib)$", name)
    return m is None or m.group(1) == "cpu" or m.group(1) in keep
dst = os.path.join(dst_dir, os.path.basename(src))
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if not wanted(info.filename):
            continue
        data = zi.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if wanted(l.split(",")[0])) + "\n").encode()
        zo.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
print(f"pack: {os.path.basename(src)}: {os.path.getsize(src) >> 20} MiB -> {os.path.getsize(dst) >> 20} MiB (kept {' '.join(keep)} + cpu)")
PY
    else
      echo "pack: could not download bitsandbytes==$bnb_version: peers run without it" >&2
    fi
  fi

  # The binaries share most of their code: one xz stream with a window over all of them.
  local tree_b gpu_b tries=0
  tree_b=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
    | awk '{ s += $1 } END { print s + 0 }')
  while :; do
    tar -C "$stage/bin" -cf - "${members[@]}" | xz -9e -T1 >.gpu/bins.tar.xz
    gpu_b=$(du -sb .gpu | cut -f1)
    if [ "$gpu_b" -le $((max_mib << 20)) ] && [ $((gpu_b + tree_b)) -le $((63 << 20)) ]; then break; fi
    # Over the carry: drop the lowest-priority wgpu test binary and try again.
    [ "${#members[@]}" -gt $((1 + ${#cuda_tests[@]})) ] || { echo "pack: does not fit even without the wgpu tests" >&2; exit 1; }
    echo "pack: $((gpu_b >> 20)) MiB: leaving out ${members[-1]}" >&2
    unset 'members[-1]'
    tries=$((tries + 1))
  done
  echo "pack: .gpu/bins.tar.xz holds: ${members[*]} ($(du -sh "$stage/bin" | cut -f1) stripped)"
  ls -la .gpu/bins.tar.xz .gpu/deb .gpu/whl
  echo "pack: .gpu is $((gpu_b >> 20)) MiB ($gpu_b bytes), the tree $((tree_b >> 20)) MiB: $(((gpu_b + tree_b) >> 20)) of the 64 MiB carry"
  echo "next: run(command=\"bash scripts/gpu-check.sh run\", carry=[\".gpu\"], timeout_s=480)"
}

# ------------------------------------------------------------------------------------------
# helpers of run (exported environment: GC_OUT, GC_TMP, GC_BIN, STEP_SECONDS)
# ------------------------------------------------------------------------------------------
say() { echo "$*" >&3; } # to the console from inside a step (its stdout goes to the log)
note() { echo "$*" >"$GC_TMP/note.$GC_STEP"; say "   $*"; }
left_in_step() { echo $((GC_STEP_END - SECONDS)); }
mylog() { tail -c +"$((GC_LOG_FROM + 1))" "$GC_LOG"; } # this step's part of its log
# The first line that says why a resource is missing, into steps.txt and to the console.
first_reason() {
  local r
  r=$(mylog | grep -m1 -E "LORAFUSE_REQUIRE lists|unavailable:|^error:" | cut -c1-200)
  [ -z "$r" ] || note "$r"
}

vulkan_env() {
  if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
    if ls .gpu/deb/*.deb >/dev/null 2>&1; then
      local f
      for f in .gpu/deb/*.deb; do dpkg -x "$f" / || echo "dpkg -x $f / failed (not root?)"; done
      ldconfig || true
      echo "unpacked the loader debs of .gpu/deb into /"
    else
      echo "no libvulkan.so.1 here and no .gpu/deb: wgpu will find no adapter"
    fi
  fi
  local icd
  for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json \
    /etc/vulkan/icd.d/nvidia_icd.json; do
    if [ -z "${VK_DRIVER_FILES:-}" ] && [ -e "$icd" ]; then export VK_DRIVER_FILES="$icd"; fi
  done
  echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-(loader default)}"
}

# `sanitize TOOL`: the representative tests under compute-sanitizer, each boxed to an even share
# of the step's time left (what a quick test leaves goes to the next), then the extras.
sanitize() {
  local tool=$1 short=() fail=0 i t rc box n_left
  if ! command -v compute-sanitizer >/dev/null; then
    note "compute-sanitizer not found (PATH, \$CUDA_HOME/bin): $tool not run"
    return 1
  fi
  local all=("${san_tests[@]}" "${san_extra[@]}") names c inst
  for i in "${!all[@]}"; do
    t=${all[$i]%%:*}
    # the family's checks in every instance, as exact test names
    names=()
    for inst in "${san_instances[@]}"; do
      for c in ${all[$i]#*:}; do names+=("$inst::$c"); done
    done
    n_left=$((${#san_tests[@]} - i))
    [ "$n_left" -ge 1 ] || n_left=1
    box=$(($(left_in_step) / n_left))
    if [ "$box" -lt 5 ]; then
      echo "== $tool $t: not run (no time left in the step)"
      say "   $tool $t: not run (no time)"
      [ "$i" -lt "${#san_tests[@]}" ] && short+=("$t")
      continue
    fi
    echo "== $tool $t (box ${box}s): ${names[*]}"
    LORAFUSE_REQUIRE=cuda timeout -k 3 "$box" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --print-limit 20 "$GC_BIN/backend_ops" --exact "${names[@]}" --test-threads=1
    rc=$?
    case $rc in
      0) say "   $tool $t: clean" ;;
      124 | 137) short+=("$t"); echo "(stopped at ${box}s)"; say "   $tool $t: stopped at its ${box}s box" ;;
      3) fail=1; say "   $tool $t: ERRORS (see sanitizer.log)" ;;
      *) fail=1; say "   $tool $t: exit $rc (the test failed or the tool could not run)" ;;
    esac
  done
  mylog | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | tail -n 12 >&3 || true
  [ "${#short[@]}" -eq 0 ] || note "stopped or not run for time: ${short[*]}"
  [ "$fail" -eq 0 ] || return 1
  [ "${#short[@]}" -eq 0 ] || return 75
}

# Writes $GC_OUT/benchmarks-section.md from the parts written so far.
join_sections() {
  cat "$GC_TMP"/section-cuda.md "$GC_TMP"/section-wgpu.md 2>/dev/null >"$GC_OUT/benchmarks-section.md"
}

# ------------------------------------------------------------------------------------------
# the steps (each runs in its own process under `timeout`; exit 0 ran, 77 skipped, 75 cut
# inside, 124/137 stopped at the box, anything else failed)
# ------------------------------------------------------------------------------------------
step_compile() {
  LORAFUSE_REQUIRE=nvrtc "$GC_BIN/cuda_compile" --nocapture
  local rc=$?
  first_reason
  mylog | grep -E "^test result" | tail -n 1 >&3
  return "$rc"
}

step_parity() {
  local rc=0 r inst
  LORAFUSE_REQUIRE=cuda "$GC_BIN/cuda_backend" --test-threads="${GPU_CHECK_TEST_THREADS:-1}" || rc=1
  # The generic suite one dtype at a time (f32 first), so that a step cut at its box keeps the
  # dtypes it finished; the filter `cuda_f32::` selects that instance's tests.
  for inst in "${parity_instances[@]}"; do
    echo "== backend_ops $inst::"
    LORAFUSE_REQUIRE=cuda "$GC_BIN/backend_ops" "$inst::" --test-threads="${GPU_CHECK_TEST_THREADS:-1}"
    r=$?
    [ "$r" -eq 0 ] || rc=1
    say "   backend_ops $inst: $(mylog | grep -E '^test result' | tail -n 1)"
  done
  # The additive and selective methods on the golden tiny Llama against PEFT and the adapters
  # library (tests/golden_seeds.rs, its cuda:: cases).
  if [ -x "$GC_BIN/golden_seeds" ]; then
    echo "== golden_seeds cuda::"
    LORAFUSE_REQUIRE=cuda "$GC_BIN/golden_seeds" "cuda::" --test-threads="${GPU_CHECK_TEST_THREADS:-1}" || rc=1
    say "   golden_seeds cuda: $(mylog | grep -E '^test result' | tail -n 1)"
  fi
  # Many adapters in one batch: PEFT's mixed batch (golden_multi) and K adapters trained in one
  # pass against each alone (multi_train), their on_cuda cases.
  for t in golden_multi multi_train; do
    [ -x "$GC_BIN/$t" ] || continue
    echo "== $t on_cuda"
    LORAFUSE_REQUIRE=cuda "$GC_BIN/$t" "on_cuda" --test-threads="${GPU_CHECK_TEST_THREADS:-1}" || rc=1
    say "   $t cuda: $(mylog | grep -E '^test result' | tail -n 1)"
  done
  first_reason
  mylog | grep -E "^test result|^test .* FAILED" | tail -n 8 >&3
  return "$rc"
}

step_bench() {
  LORAFUSE_REQUIRE=cuda LORAFUSE_BENCH_OUT="$GC_OUT/ours.json" "$GC_BIN/cuda_bench" --ignored --nocapture
  local rc=$?
  first_reason
  mylog | grep -E "^device |% of copy|panicked at" | tail -n 20 >&3
  return "$rc"
}

step_peers() {
  local py="${PEERS_PYTHON:-python3}"
  # find_spec: whether it is there, without paying for an import.
  if ! "$py" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null; then
    note "no torch in $py: peers not measured (torch with CUDA is GBs: never carried)"
    return 77
  fi
  if ! "$py" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("bitsandbytes") is None)' 2>/dev/null \
    && ls .gpu/whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$GC_TMP/site" .gpu/whl/*.whl && export PYTHONPATH="$GC_TMP/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  PYTHONUNBUFFERED=1 "$py" - "$GC_OUT/peers.json" <<'PY'
import json, sys, time
import torch
out = sys.argv[1]
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: peers not measured")
dev = "cuda"
res = {}
meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
def save():
    # After every case, so that a call stopped at its limit keeps what was measured.
    d = {k: {"peer": v[0], "ms": v[1]} for k, v in res.items()}
    d["_versions"] = meta
    json.dump(d, open(out, "w"), indent=1)
def bench(f, n_min=5):
    for _ in range(3): f()
    torch.cuda.synchronize()
    ts = []
    t0 = time.perf_counter()
    while len(ts) < 200 and (len(ts) < n_min or time.perf_counter() - t0 < 0.5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]
bf = torch.bfloat16
big = torch.empty(1 << 29, dtype=bf, device=dev).uniform_(-1, 1)
res["copy_1GiB"] = ("torch clone", bench(lambda: big.clone()))
del big
save()
try:
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit, dequantize_4bit
    meta["bitsandbytes"] = bnb.__version__
    for out_, in_ in [(4096, 4096), (14336, 4096)]:
        W = (torch.randn(out_, in_, device=dev) * 0.05).to(bf)
        qW, st = quantize_4bit(W, quant_type="nf4", compress_statistics=True, blocksize=64)
        res[f"nf4_dequantize_{out_}x{in_}"] = ("bnb dequantize_4bit", bench(lambda: dequantize_4bit(qW, st)))
        for t in [1, 16, 64]:
            x = torch.randn(t, in_, device=dev, dtype=bf)
            peer = "bnb gemv_4bit" if t == 1 else "bnb matmul_4bit"
            res[f"nf4_linear_t{t}_{out_}x{in_}"] = (peer, bench(lambda: bnb.matmul_4bit(x, qW.t(), quant_state=st)))
            save()
except Exception as e:  # bitsandbytes missing or failing: say so, keep the rest
    print("bitsandbytes unavailable:", repr(e))
    meta["bitsandbytes"] = f"unavailable: {e!r}"[:200]
try:
    import peft
    from peft import LoraConfig, get_peft_model
    meta["peft"] = peft.__version__
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
            save()
except Exception as e:
    print("peft unavailable:", repr(e))
    meta["peft"] = f"unavailable: {e!r}"[:200]
save()
print("peers:", {k: round(v[1], 4) for k, v in res.items()})
print("versions:", meta)
PY
  local rc=$?
  mylog | grep -E "^peers:|^versions:|unavailable|sees no CUDA|Error" | tail -n 4 >&3
  return "$rc"
}

step_section() {
  if [ ! -s "$GC_OUT/ours.json" ]; then
    note "no ours.json (the bench step did not finish): no section"
    return 77
  fi
  python3 - "$GC_OUT/ours.json" "$GC_OUT/peers.json" "$GC_TMP/section-cuda.md" <<'PY' || return 1
import json, sys, datetime, os
ours = json.load(open(sys.argv[1]))
peers = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else {}
v = peers.get("_versions", {})
who = ", ".join(f"{k} {v[k]}" for k in ("torch", "peft", "bitsandbytes") if k in v and "unavailable" not in str(v[k]))
lines = [f"\n## CUDA backend vs torch / PEFT / bitsandbytes, {datetime.date.today().isoformat()}, {ours['device']}\n",
         "Same run, same device (scripts/gpu-check.sh); bf16 storage, f32 accumulation; medians. "
         f"Measured device-to-device copy bandwidth {ours['copy_gbps']:.0f} GB/s (bytes read + written). "
         "Ratio = peer time / our time (> 1: we are faster). %copy = the bytes the kernel must move / "
         "time, as a fraction of the copy bandwidth." + (f" Peers: {who}." if who else " No peers measured.") + "\n",
         "| case | ours ms | peer | peer ms | peer/ours | %copy |", "| --- | ---: | --- | ---: | ---: | ---: |"]
own = {c["name"]: c for c in ours["cases"]}
for c in ours["cases"]:
    p = peers.get(c["name"])
    if p:
        lines.append(f"| {c['name']} | {c['ms']:.4f} | {p['peer']} | {p['ms']:.4f} | {p['ms'] / c['ms']:.2f}x | "
                     f"{100 * c['frac_copy']:.0f}% |")
    else:
        lines.append(f"| {c['name']} | {c['ms']:.4f} | not measured | | | {100 * c['frac_copy']:.0f}% |")
for t in (256, 4096):
    l, d = own.get(f"lora_fwd_bwd_t{t}_4096x4096_r16"), own.get(f"dora_fwd_bwd_t{t}_4096x4096_r16")
    if l and d:
        lines.append(f"\nDoRA / our LoRA at {t} tokens: {d['ms'] / l['ms']:.2f}x.")
open(sys.argv[3], "w").write("\n".join(lines) + "\n")
PY
  join_sections
  tail -n +2 "$GC_TMP/section-cuda.md" | head -n 30 >&3
}

step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }

step_wgpu_tests() {
  vulkan_env
  local t rc box short=() fail=0 missing=() filter
  for t in backend_ops "${wgpu_tests[@]}"; do
    if [ ! -x "$GC_BIN/$t" ]; then missing+=("$t"); continue; fi
    box=$(left_in_step)
    if [ "$box" -lt 5 ]; then
      short+=("$t"); echo "== $t: not run (no time left in the step)"; say "   $t: not run (no time)"; continue
    fi
    # backend_ops: its wgpu instances only (its CUDA ones ran in the parity step)
    filter=()
    [ "$t" != backend_ops ] || filter=("$wgpu_suite_filter")
    echo "== $t ${filter[*]} (box ${box}s)"
    timeout -k 3 "$box" env LORAFUSE_REQUIRE="${GPU_CHECK_WGPU_REQUIRE:-wgpu}" "$GC_BIN/$t" ${filter[@]+"${filter[@]}"} --nocapture
    rc=$?
    case $rc in
      0) say "   $t: $(mylog | grep -E '^test result' | tail -n 1)" ;;
      124 | 137) short+=("$t"); say "   $t: stopped at its ${box}s box" ;;
      *) fail=1; say "   $t: FAILED (exit $rc)"; mylog | grep -E "panicked at|^test .* FAILED" | tail -n 3 >&3 ;;
    esac
  done
  mylog | grep -m1 -E "^wgpu adapter:" >&3 || true
  local msg=""
  [ "${#short[@]}" -eq 0 ] || msg="stopped or not run for time: ${short[*]}"
  [ "${#missing[@]}" -eq 0 ] || msg="${msg:+$msg; }not in the pack: ${missing[*]}"
  [ -z "$msg" ] || note "$msg"
  [ "$fail" -eq 0 ] || return 1
  [ -z "$msg" ] || return 75
}

step_wgpu_bench() {
  vulkan_env
  local dev box rc fail=0 cut=0 cases="${GPU_CHECK_CASES:-default}"
  for dev in wgpu cuda; do
    box=$(left_in_step)
    # Half each; in a dry run (no GPU: the cuda run fails at once) wgpu takes all but 15 s.
    if [ "$dev" = wgpu ]; then
      if [ -n "${GC_DRY:-}" ]; then box=$((box - 15)); else box=$((box / 2)); fi
    fi
    if [ "$box" -lt 10 ]; then cut=1; say "   bench --device $dev: not run (no time)"; continue; fi
    echo "== lorafuse bench --device $dev --cases $cases (box ${box}s)"
    rm -f "$GC_TMP/bench-$dev.json"
    timeout -k 3 "$box" "$GC_BIN/lorafuse" bench --device "$dev" --cases "$cases" \
      --min-time "${GPU_CHECK_MIN_TIME:-0.5}" --json "$GC_TMP/bench-$dev.json"
    rc=$?
    case $rc in
      0) ;;
      124 | 137) cut=1; say "   bench --device $dev: stopped at its ${box}s box" ;;
      *) fail=1; say "   bench --device $dev: FAILED (exit $rc)"; first_reason ;;
    esac
    # Both devices' rows in one file, rewritten as each finishes.
    python3 - "$GC_TMP" "$GC_OUT/devices.json" <<'PY'
import json, os, sys
d = {}
for dev in ("wgpu", "cuda"):
    p = os.path.join(sys.argv[1], f"bench-{dev}.json")
    if os.path.exists(p):
        d[dev] = json.load(open(p))
json.dump(d, open(sys.argv[2], "w"), indent=1)
PY
    if [ -s "$GC_TMP/bench-$dev.json" ]; then
      python3 - "$GC_TMP/bench-$dev.json" "$dev" <<'PY' >&3
import json, sys
r = json.load(open(sys.argv[1]))
if r:
    print(f"   {sys.argv[2]}: {len(r)} cases; SGEMM {r[0]['peak_sgemm_gflops']:.0f} GFLOP/s; bandwidth "
          f"{r[0]['peak_copy_gbps']:.0f} GB/s ({r[0].get('peak_bandwidth', 'host_memory')})")
PY
    fi
  done
  [ "$fail" -eq 0 ] || return 1
  [ "$cut" -eq 0 ] || return 75
}

step_wgpu_section() {
  python3 - "$GC_OUT/devices.json" "$GC_TMP/section-wgpu.md" "$GC_OUT/steps.txt" <<'PY'
import json, sys, datetime, os
d = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {}
w = {r["case"]: r for r in d.get("wgpu", [])}
c = {r["case"]: r for r in d.get("cuda", [])}
if not w or not c:
    print("no results of both devices in devices.json: no section")
    sys.exit(77)
gpu = "GPU"
for line in open(sys.argv[3]):
    if line.startswith("# ") and "device: " in line:
        gpu = line.split("device: ", 1)[1].split(";")[0].strip()
rw, rc = next(iter(w.values())), next(iter(c.values()))
kind = lambda r: str(r.get("peak_bandwidth", "host_memory")).replace("_", " ")
lines = [f"\n## WGSL backend (Vulkan) vs CUDA backend, {datetime.date.today().isoformat()}, {gpu}, same run\n",
         "f32 storage on both; `lorafuse bench` medians; ratio = CUDA time / wgpu time (issue 5 bars: "
         "LoRA fwd+bwd >= 0.5, NF4 dequant-matmul >= 0.6 of CUDA throughput, tiled matmul >= 0.4 of cuBLAS). "
         f"Bandwidth measured by each backend in the same run: wgpu {rw['peak_copy_gbps']:.0f} GB/s, "
         f"CUDA {rc['peak_copy_gbps']:.0f} GB/s ({kind(rc)}, bytes read + written).\n",
         "| case | wgpu ms | cuda ms | cuda/wgpu | wgpu %bw | cuda %bw |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
for name, r in w.items():
    if name in c:
        lines.append(f"| {name} | {1e3 * r['ours_s']:.3f} | {1e3 * c[name]['ours_s']:.3f} | "
                     f"{c[name]['ours_s'] / r['ours_s']:.2f} | {100 * r['frac_peak_bw']:.0f}% | "
                     f"{100 * c[name]['frac_peak_bw']:.0f}% |")
pw, pc = rw["peak_sgemm_gflops"], rc["peak_sgemm_gflops"]
lines.append(f"\nSGEMM 2048^3 through `linear`: wgpu tiled matmul {pw:.0f} GFLOP/s, cuBLAS {pc:.0f} GFLOP/s ({100 * pw / pc:.0f}%).")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines[2:8] + lines[-1:]))
PY
  local rc=$?
  [ "$rc" -ne 77 ] || note "no results of both devices in devices.json: no section"
  [ "$rc" -eq 0 ] || return "$rc"
  join_sections
  tail -n +3 "$GC_TMP/section-wgpu.md" >&3
}

# ------------------------------------------------------------------------------------------
# run (on the GPU machine; here, a dry run)
# ------------------------------------------------------------------------------------------
declare -A state secs why
write_steps() {
  local n
  {
    echo "# gpu-check run $started; device: $gpu_name; budget ${budget}s, $((SECONDS - t0))s used"
    printf '%-13s %-8s %7s  %s\n' step state seconds note
    for n in "${order[@]}"; do
      printf '%-13s %-8s %7s  %s\n' "$n" "${state[$n]:-pending}" "${secs[$n]:--}" "${why[$n]:-}"
    done
  } >"$GC_OUT/steps.txt"
}

run_step() {
  local n=$1 box left t_start rc from log="$GC_OUT/${logfile[$1]}"
  left=$((deadline - SECONDS))
  box=${cap[$n]}
  [ "$left" -lt "$box" ] && box=$left
  if [ "$box" -lt "${least[$n]}" ]; then
    state[$n]="cut"; secs[$n]=0; why[$n]="not started: ${left}s left, needs ${least[$n]}s"
    echo "== $n: cut (${left}s left, needs ${least[$n]}s)"
    write_steps
    return
  fi
  state[$n]=running; why[$n]="box ${box}s; still running when this was written: a killed call stopped here"
  write_steps
  echo "== $n (box ${box}s, $((deadline - SECONDS))s left) $(date +%T)"
  echo "==== $n $(date +%T) (box ${box}s)" >>"$log"
  rm -f "$GC_TMP/note.$n"
  from=$(stat -c %s "$log")
  t_start=$SECONDS
  GC_STEP=$n STEP_SECONDS=$box GC_LOG=$log GC_LOG_FROM=$from timeout -k 5 "$box" bash "$self" _step "$n" 3>&1 >>"$log" 2>&1
  rc=$?
  secs[$n]=$((SECONDS - t_start))
  why[$n]=$(cat "$GC_TMP/note.$n" 2>/dev/null || true)
  case $rc in
    0) state[$n]=ran ;;
    77) state[$n]=skipped ;;
    75) state[$n]="cut"; why[$n]="${why[$n]:-parts stopped at their time box}" ;;
    124 | 137) state[$n]="cut"; why[$n]="${why[$n]:+${why[$n]}; }stopped at its ${box}s box; kept what it wrote" ;;
    *) state[$n]=failed; why[$n]="${why[$n]:+${why[$n]}; }exit $rc; see ${logfile[$n]}" ;;
  esac
  echo "-- $n: ${state[$n]} in ${secs[$n]}s${why[$n]:+ (${why[$n]})}"
  write_steps
}

run() {
  local want=("$@") n
  if [ "${#want[@]}" -eq 0 ]; then want=("${order[@]}"); fi
  for n in "${want[@]}"; do
    [ -n "${cap[$n]:-}" ] || { echo "unknown step '$n'; steps: ${order[*]}" >&2; exit 2; }
  done
  export GC_OUT="${OUT:-target/gpu-check}" GC_TMP="${GPU_CHECK_TMP:-/tmp/gpu-check}"
  export GC_BIN="$GC_TMP/bin"
  mkdir -p "$GC_OUT" "$GC_TMP"
  GC_OUT=$(cd "$GC_OUT" && pwd)
  budget="${GPU_CHECK_BUDGET:-470}"
  t0=$SECONDS
  deadline=$((t0 + budget - 5)) # 5 s for the summary
  started=$(date -u +%FT%TZ)
  rm -f "$GC_TMP"/note.* "$GC_TMP"/section-*.md "$GC_TMP"/bench-*.json "$GC_TMP/skipped.log"

  # The machine.
  gpu_name=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
  if [ -n "$gpu_name" ]; then
    nvidia-smi >"$GC_OUT/cuda.log" 2>&1
  else
    gpu_name="no NVIDIA GPU (nvidia-smi absent or failing)"
    echo "nvidia-smi: no NVIDIA GPU/driver here; the CUDA steps will fail fast" >"$GC_OUT/cuda.log"
    # A dry run: the small cases, whose timings mean nothing but exercise every path.
    export GPU_CHECK_CASES="${GPU_CHECK_CASES:-small}" GC_DRY=1
    echo "no NVIDIA GPU here: a dry run (CUDA steps fail fast; lorafuse bench --cases $GPU_CHECK_CASES)"
  fi
  echo "gpu-check run: $gpu_name; budget ${budget}s; steps: ${want[*]}"

  # The pack: binaries unpacked outside the tree (not carried back, not in git's way).
  if [ ! -s .gpu/bins.tar.xz ]; then
    echo "missing .gpu/bins.tar.xz: run 'bash scripts/gpu-check.sh pack' here first and carry .gpu" >&2
    exit 2
  fi
  if [ ! -e "$GC_BIN/.unpacked" ] || [ .gpu/bins.tar.xz -nt "$GC_BIN/.unpacked" ]; then
    rm -rf "$GC_BIN" && mkdir -p "$GC_BIN"
    if command -v xz >/dev/null; then
      tar -xJf .gpu/bins.tar.xz -C "$GC_BIN"
    else
      python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .gpu/bins.tar.xz "$GC_BIN"
    fi || { echo "could not unpack .gpu/bins.tar.xz" >&2; exit 2; }
    touch "$GC_BIN/.unpacked"
  fi
  echo "unpacked: $(cd "$GC_BIN" && echo *) ($((SECONDS - t0))s)"

  # The machine's CUDA for NVRTC (headers), cuBLAS and ptxas; a PTX cache shared by the steps.
  cuda="${CUDA_HOME:-/usr/local/cuda}"
  export LD_LIBRARY_PATH="$cuda/lib64:$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PATH="$cuda/bin:$PATH"
  [ -n "${LORAFUSE_CUDA_INCLUDE:-}" ] || [ ! -d "$cuda/include" ] || export LORAFUSE_CUDA_INCLUDE="$cuda/include"
  [ -n "${LORAFUSE_PTXAS:-}" ] || [ ! -x "$cuda/bin/ptxas" ] || export LORAFUSE_PTXAS="$cuda/bin/ptxas"
  export LORAFUSE_CACHE="${LORAFUSE_CACHE:-$GC_TMP/cache}"
  export LORAFUSE_REPO_DIR="$PWD" LORAFUSE_SKIP_LOG="$GC_TMP/skipped.log"
  export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
  # The test binaries were built elsewhere: their compiled-in tests/golden path is not here.
  export LORAFUSE_GOLDEN_DIR="${LORAFUSE_GOLDEN_DIR:-$PWD/tests/golden}"

  for n in "${order[@]}"; do
    if [[ " ${want[*]} " == *" $n "* ]]; then state[$n]=pending; else state[$n]=skipped; why[$n]="not selected"; secs[$n]=0; fi
  done
  write_steps
  for n in "${order[@]}"; do
    [ "${state[$n]}" = pending ] && run_step "$n"
  done

  local ran=() cuts=() failed=() skipped=() rc=0
  for n in "${order[@]}"; do
    case ${state[$n]} in
      ran) ran+=("$n") ;; cut) cuts+=("$n") ;; failed) failed+=("$n"); rc=1 ;; *) skipped+=("$n") ;;
    esac
  done
  if [ -s "$LORAFUSE_SKIP_LOG" ]; then
    echo "tests that skipped for a missing resource:"
    cut -f1 "$LORAFUSE_SKIP_LOG" | sort | uniq -c
  fi
  echo
  cat "$GC_OUT/steps.txt"
  echo "ran: ${ran[*]:-none}"
  echo "cut: ${cuts[*]:-none}${cuts[*]:+  (rerun with: bash scripts/gpu-check.sh run ${cuts[*]})}"
  echo "failed: ${failed[*]:-none}"
  echo "skipped: ${skipped[*]:-none}"
  local files
  files=$(find "$GC_OUT" -type f | wc -l)
  [ "$files" -le 8 ] || echo "warning: $files files under $GC_OUT; the device returns at most 8"
  echo "gpu-check: $((SECONDS - t0))s of ${budget}s; results in $GC_OUT: $(cd "$GC_OUT" && echo *)"
  exit "$rc"
}

case $mode in
  pack | pack-wgpu) pack ;; # pack-wgpu: the old name; one pack now holds both backends
  run) run "$@" ;;
  run-wgpu) run wgpu-tests wgpu-bench wgpu-section ;;
  _step)
    n=$1
    GC_STEP_END=$((SECONDS + STEP_SECONDS - 2)) # this shell's clock: inner time boxes end here
    case $n in
      compile) step_compile ;; parity) step_parity ;; bench) step_bench ;; peers) step_peers ;;
      section) step_section ;; memcheck) step_memcheck ;; racecheck) step_racecheck ;;
      wgpu-tests) step_wgpu_tests ;; wgpu-bench) step_wgpu_bench ;; wgpu-section) step_wgpu_section ;;
      *) echo "unknown step $n" >&2; exit 2 ;;
    esac
    ;;
  *) echo "usage: $0 pack | run [STEP...] | run-wgpu   (steps: ${order[*]})" >&2; exit 2 ;;
esac
