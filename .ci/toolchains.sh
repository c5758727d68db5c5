#!/usr/bin/env bash
# CI: the kernels on every supported Triton, the native baselines, and the GPU check's dry run.
# (Called by .ci/run; each part also runs alone.)
#
#   bash .ci/toolchains.sh             compile + native + gpu_dry
#   bash .ci/toolchains.sh compile     per triton in TRITONS, in a venv beside the CPU torch wheel:
#                                      the compile gate's representative subset for sm_80, sm_90 and
#                                      sm_100 (every variant: pytest -m compile_all), then the static
#                                      cost report's budgets for the selection shape it runs
#   bash .ci/toolchains.sh native      kernels/ built once with nvcc (sm_90): a broken .cu fails
#   bash .ci/toolchains.sh gpu_dry     python -m benchmarks.gpu_check --dry in a venv shaped like
#                                      the lent GPU image (triton 3.6.0; no bitsandbytes, gguf, trl)
#
# Venvs live under $CI_WORK (reused when it is given and they exist). Budget on the 2-core CI
# machine: ~2 min per triton (install, ~90 compiles, budgets), ~30 s native, ~2 min dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CI_WORK=${CI_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gallop-ci.XXXXXX")}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The supported range, oldest to newest: the triton each CUDA torch pins (2.10/2.11 -> 3.6.0,
# 2.12/2.13 -> 3.7.1, 2.14 -> 3.8.0) and the newest release. pyproject.toml: triton>=3.6.
TRITONS=(3.6.0 3.7.1 3.8.0 3.9.0)
TORCH=2.13.0  # the CPU wheel: any triton runs beside it for compiling (pip may warn about its pin)
IMAGE_TRITON=3.6.0  # the lent GPU image: torch 2.11 + triton 3.6.0, Python 3.12

venv_for() {  # venv_for NAME VERSION [EXTRA PACKAGES...]: a venv with torch + that triton
    local name=$1 version=$2; shift 2
    local dir="$CI_WORK/venv-$name"
    if [[ ! -x "$dir/bin/python" ]]; then
        python3 -m venv "$dir"
        "$dir/bin/pip" install --quiet "torch==$TORCH" "triton==$version" "$@"
    fi
    echo "$dir"
}

part_compile() {
    local v dir out
    for v in "${TRITONS[@]}"; do
        echo "-- triton $v"
        dir=$(venv_for "triton-$v" "$v")
        out="$CI_WORK/static-costs-$v"
        mkdir -p "$out"
        (cd "$ROOT" && env -u TRITON_INTERPRET PYTHONPATH="$ROOT" \
            "$dir/bin/python" -m gallop_kernels.ops._triton.compile_gate --subset \
            --arch 80 90 100 --jobs 2 > "$out/compile.jsonl") || true  # (failures listed below)
        python3 - "$out/compile.jsonl" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
head, rows = lines[0], [r for r in lines if "kernel" in r]
bad = [r for r in rows if not r["ok"]]
print(f"   {head}: {len(rows) - len(bad)} of {len(rows)} variants compiled")
for r in bad:
    print(f"   FAILED {r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['error'][:500]}")
sys.exit(1 if bad or not rows else 0)
EOF
        (cd "$ROOT" && env -u TRITON_INTERPRET PYTHONPATH="$ROOT" \
            "$dir/bin/python" -m benchmarks.static_costs --check --budget-only --out "$out")
    done
}

part_native() {
    if ! command -v nvcc > /dev/null; then
        echo "nvcc is not installed: the native baselines are not built"
        return 1
    fi
    cmake -S "$ROOT" -B "$CI_WORK/native" -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DGALLOP_BASELINES_REQUIRE_CUDA=ON > "$CI_WORK/native.log"
    cmake --build "$CI_WORK/native" -j 2 >> "$CI_WORK/native.log"
    test -f "$CI_WORK/native/libgallop_baselines.so"
    echo "built $CI_WORK/native/libgallop_baselines.so"
}

part_gpu_dry() {
    # shaped like the image: its triton, the packages the check uses that the image has
    # (transformers, peft, pytest, hypothesis, pytest-benchmark), none that it lacks
    local dir
    # (numpy < 2.3: triton 3.6's interpreter turns a loaded loop bound into an int with int() on
    # a one-element array, which newer numpy refuses; the image itself never interprets)
    dir=$(venv_for image "$IMAGE_TRITON" "transformers>=4.45" "peft>=0.13" "safetensors>=0.4" \
        "pytest>=8" "hypothesis>=6" "pytest-benchmark>=4" "numpy<2.3")
    for missing in bitsandbytes gguf trl; do
        if "$dir/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$missing') is None)"; then
            echo "the image-shaped venv must not have $missing"; return 1
        fi
    done
    (cd "$ROOT" && PYTHONPATH="$ROOT" "$dir/bin/python" -m benchmarks.gpu_check --dry \
        --out "$CI_WORK/gpu-check-dry" --budget-scale 3)
}

parts=("$@")
((${#parts[@]})) || parts=(compile native gpu_dry)
echo "CI work folder: $CI_WORK"
for part in "${parts[@]}"; do
    echo "== toolchains: $part"
    t0=$SECONDS
    "part_$part"
    echo "== toolchains: $part ok ($((SECONDS - t0)) s)"
done
