#!/usr/bin/env bash
# GPU suite, in phases (BENCHMARKS.md, "GPU run", says how it fits the H200 machine's calls):
#   pytest   pytest -m gpu (every GPU test that runs without TensorRT), log in OUT; in the
#            background beside the first export, waited for before the first timed phase
#   export   random real-size weights of each preset and its model directory (fp32 + fp16 graphs,
#            each checked against PyTorch fp32 on the GPU; engines too where TensorRT is installed;
#            where a check fails, the phase fails and the fp32 graphs alone are exported for the
#            phases that follow)
#   loop     the denoiser loop alone: fp16/fp32 graphs, CUDA graphs on/off (denoiser_loop.py)
#   profile  ONNX Runtime's profiler over one plain fp16 loop: ms per step, host time in node
#            calls, nodes per step, the costliest op types (denoiser_profile.py)
#   parity   the denoiser's ONNX Runtime graphs (fp32, fp16) of the exported directory against
#            PyTorch fp32 on the GPU, one step timed, and the 25-step drift of fp16 next to the
#            PyTorch reference's bf16 (gpu_parity.py --model; every stage's graphs were checked
#            on the GPU by the export, whose manifest is copied to OUT)
#   rtf      the runtime against the reference-style PyTorch pipeline (bf16), per stage and end
#            to end (rtf.py)
#   video    video preprocessing on the GPU path (video.py; needs PyAV)
# Each phase's JSON (or log) goes to OUT; a phase that fails is reported and the next one runs;
# the exit status is 1 when any failed. Model directories and inputs stay in MMSEP_BENCH_WORK, so
# that a later call on the same machine can run the remaining phases.
#
#   benchmarks/gpu.sh [OUT]            (default OUT: bench-gpu)
#
# Environment: MMSEP_GPU_PHASES (default "pytest export loop profile parity rtf video"),
# MMSEP_PARITY_STAGES (gpu_parity.py --stages; default denoiser, "all" for every stage),
# MMSEP_BENCH_PRESETS (default "large_44k_v2"), MMSEP_BENCH_DURATIONS (default "8"),
# MMSEP_BENCH_BATCH (default "1,4"), MMSEP_BENCH_REPEATS (default 3), MMSEP_BENCH_VIDEO_SIZE
# (default 1280x720), MMSEP_BENCH_WORK (default /tmp/mmsep-bench-work: outside OUT, whose files
# are what a lent machine sends back).
# MMSEP_BENCH_PRESETS=tiny runs the same logic on a CPU-only machine (ort-cpu, tiny model).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-bench-gpu}
known_phases="pytest export loop profile parity rtf video"
phases=" ${MMSEP_GPU_PHASES:-$known_phases} "
for name in $phases; do  # a misspelt phase would run nothing, silently
    if [[ " $known_phases " != *" $name "* ]]; then
        echo "gpu.sh: error: unknown phase '$name' in MMSEP_GPU_PHASES (space-separated, from:" \
             "$known_phases)" >&2
        exit 2
    fi
done
presets=${MMSEP_BENCH_PRESETS:-large_44k_v2}
durations=${MMSEP_BENCH_DURATIONS:-8}
batch=${MMSEP_BENCH_BATCH:-1,4}
repeats=${MMSEP_BENCH_REPEATS:-3}
video_size=${MMSEP_BENCH_VIDEO_SIZE:-1280x720}
work=${MMSEP_BENCH_WORK:-/tmp/mmsep-bench-work}
mkdir -p "$out" "$work" || exit 2
export PYTHONUNBUFFERED=1
failed=()

has_gpu=$(python -c 'import torch; print(int(torch.cuda.is_available()))')
has_ort_cuda=$(python -c 'import onnxruntime as o; print(int("CUDAExecutionProvider" in o.get_available_providers()))')
has_trt=0
python -c 'import tensorrt' 2>/dev/null && has_trt=1

backends=()
if [[ $has_gpu == 1 ]]; then
    [[ $has_trt == 1 ]] && backends+=(trt) \
        || echo "gpu.sh: TensorRT is not installed: no engines, measuring ONNX Runtime CUDA and torch"
    [[ $has_ort_cuda == 1 ]] && backends+=(ort-cuda) \
        || echo "gpu.sh: onnxruntime-gpu (CUDAExecutionProvider) is not installed: no ort-cuda"
    if [[ ${#backends[@]} == 0 ]]; then
        echo "gpu.sh: error: a GPU is present but neither TensorRT nor onnxruntime-gpu is" \
             "installed; install one of them" >&2
        exit 2
    fi
    ort_backend=ort-cuda device=cuda
    [[ $has_ort_cuda == 1 ]] || ort_backend=ort-cpu device=cpu
else
    echo "gpu.sh: no CUDA GPU: falling back to ort-cpu (a check of this script's logic, not a GPU result)"
    backends=(ort-cpu)
    ort_backend=ort-cpu device=cpu
fi
backend_list=$(IFS=,; echo "${backends[*]}")
parity_stages=(--stages "${MMSEP_PARITY_STAGES:-denoiser}")
[[ ${MMSEP_PARITY_STAGES:-} == all ]] && parity_stages=()

phase() {  # phase NAME COMMAND...: run it if selected, time it, record a failure
    local name=$1
    shift
    [[ $phases == *" ${name%%:*} "* ]] || return 0
    echo "gpu.sh: --- $name ---"
    local started=$SECONDS
    if "$@"; then
        echo "gpu.sh: $name done in $((SECONDS - started)) s"
    else
        echo "gpu.sh: $name FAILED (exit $?) after $((SECONDS - started)) s"
        failed+=("$name")
    fi
}

export_model() {  # export_model PRESET DIR
    # every graph checked on the GPU (PyTorch and ONNX Runtime CUDA), engines built where
    # TensorRT is present
    local source=(--preset tiny)
    if [[ $1 != tiny ]]; then
        local weights=$work/weights-$1
        if [[ ! -f $weights/weights/mmaudiosep_$1.pth ]]; then
            python -m mmsep.models.random_weights --preset "$1" --out "$weights" || return
        fi
        source=(--weights-dir "$weights" --variant "$1")
    fi
    local export=(mmsep-export "${source[@]}" --out "$2" --parity-device "$device" --jobs 8 --quiet)
    if "${export[@]}"; then
        cp "$2/manifest.json" "$out/manifest-$1.json"  # the per-stage parity, measured on the GPU
        return
    fi
    # a graph beyond its bound fails the export (the line above says which): the phases that
    # follow measure the fp32 graphs rather than nothing, and this phase still counts as failed
    echo "gpu.sh: the export failed; exporting the fp32 graphs alone for the phases that follow"
    "${export[@]}" --precision fp32 && cp "$2/manifest.json" "$out/manifest-$1-fp32.json"
    return 1
}

# pytest runs in the background, beside the export (CPU-bound tracing, mostly one core), and is
# waited for before the first timed phase, so that it disturbs no measurement
pytest_pid=
if [[ $phases == *" pytest "* ]]; then
    echo "gpu.sh: --- pytest (in the background; log in $out/pytest-gpu.log) ---"
    python -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors "$here/../tests" \
        > "$out/pytest-gpu.log" 2>&1 &
    pytest_pid=$! pytest_started=$SECONDS
fi
join_pytest() {
    [[ -n $pytest_pid ]] || return 0
    if wait "$pytest_pid"; then
        echo "gpu.sh: pytest done ($((SECONDS - pytest_started)) s): $(tail -n 1 "$out/pytest-gpu.log")"
    else
        echo "gpu.sh: pytest FAILED ($((SECONDS - pytest_started)) s): $(tail -n 1 "$out/pytest-gpu.log")"
        failed+=(pytest)
    fi
    pytest_pid=
}
for preset in $presets; do
    model=$work/models/$preset
    phase "export:$preset" export_model "$preset" "$model"
    join_pytest
    phase "loop:$preset" python "$here/denoiser_loop.py" --model "$model" --backend "$ort_backend" \
        --batch "$batch" --repeats "$((repeats + 2))" --json "$out/loop-$preset.json"
    phase "profile:$preset" python "$here/denoiser_profile.py" --model "$model" \
        --backend "$ort_backend" --json "$out/profile-$preset.json"
    phase "parity:$preset" python "$here/gpu_parity.py" --model "$model" --device "$device" \
        ${parity_stages[@]+"${parity_stages[@]}"} --json "$out/parity-$preset.json"
    phase "rtf:$preset" python "$here/rtf.py" --model "$model" --backend "$backend_list" \
        --skip-unavailable --durations "$durations" --batch "$batch" --repeats "$repeats" \
        --warmup 1 --video-size "$video_size" \
        --flops-presets tiny,small_16k,small_44k,medium_44k,large_44k,large_44k_v2 \
        --cache-dir "$work/cache" --json "$out/rtf-$preset.json"
    # the CPU side against decoding, the device-side convert + resize of one window, end to end
    # with and without the overlap (#12)
    phase "video:$preset" python "$here/video.py" --model "$model" --backend "$ort_backend" \
        --synthetic 22 --runs "$repeats" --json "$out/video-$preset.json"
done
join_pytest
echo "gpu.sh: results in $out"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu.sh: failed phases: ${failed[*]}"
    exit 1
fi
