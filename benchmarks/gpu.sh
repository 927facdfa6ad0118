#!/usr/bin/env bash
# GPU benchmark suite: real-size presets with random weights, every available GPU backend
# against the reference-style PyTorch baseline (bf16), and video preprocessing on the GPU path
# (benchmarks/video.py; needs PyAV), JSON per preset into OUT.
#
#   benchmarks/gpu.sh [OUT]            (default OUT: bench-gpu)
#
# Environment: MMSEP_BENCH_PRESETS (default "large_44k_v2 small_16k"), MMSEP_BENCH_DURATIONS
# (default "8"; "8,30" if time allows), MMSEP_BENCH_BATCH (default "1,4"), MMSEP_BENCH_REPEATS
# (default 3), MMSEP_BENCH_VIDEO_SIZE (default 1280x720), MMSEP_BENCH_WORK (weights, model
# directories and inputs; default OUT/work).
# MMSEP_BENCH_PRESETS=tiny runs the same logic on a CPU-only machine (ort-cpu, tiny model).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-bench-gpu}
presets=${MMSEP_BENCH_PRESETS:-large_44k_v2 small_16k}
durations=${MMSEP_BENCH_DURATIONS:-8}
batch=${MMSEP_BENCH_BATCH:-1,4}
repeats=${MMSEP_BENCH_REPEATS:-3}
video_size=${MMSEP_BENCH_VIDEO_SIZE:-1280x720}
work=${MMSEP_BENCH_WORK:-$out/work}
mkdir -p "$out" "$work"

has_gpu=$(python -c 'import torch; print(int(torch.cuda.is_available()))')
has_ort_cuda=$(python -c 'import onnxruntime as o; print(int("CUDAExecutionProvider" in o.get_available_providers()))')
has_trt=0
python -c 'import tensorrt' 2>/dev/null && has_trt=1

backends=()
if [[ $has_gpu == 1 ]]; then
    if [[ $has_trt == 1 ]]; then
        backends+=(trt)
    else
        echo "gpu.sh: TensorRT is not installed: no engines, measuring ONNX Runtime CUDA and torch"
    fi
    if [[ $has_ort_cuda == 1 ]]; then
        backends+=(ort-cuda)
    else
        echo "gpu.sh: onnxruntime-gpu (CUDAExecutionProvider) is not installed: no ort-cuda"
    fi
    if [[ ${#backends[@]} == 0 ]]; then
        echo "gpu.sh: error: a GPU is present but neither TensorRT nor onnxruntime-gpu is" \
             "installed; install one of them" >&2
        exit 2
    fi
else
    echo "gpu.sh: no CUDA GPU: falling back to ort-cpu (a check of this script's logic, not a GPU result)"
    backends=(ort-cpu)
fi
backend_list=$(IFS=,; echo "${backends[*]}")

for preset in $presets; do
    case $preset in
    tiny)
        model=$work/models/tiny
        mmsep-export --preset tiny --out "$model" --quiet
        ;;
    *)
        weights=$work/weights-$preset
        model=$work/models/$preset
        if [[ ! -f $weights/weights/mmaudiosep_$preset.pth ]]; then
            python -m mmsep.models.random_weights --preset "$preset" --out "$weights"
        fi
        # engines are built here where TensorRT and a GPU are present
        mmsep-export --weights-dir "$weights" --variant "$preset" --out "$model" --quiet
        ;;
    esac
    echo "gpu.sh: $preset on $backend_list (+ baseline), durations $durations, batch $batch"
    python "$here/rtf.py" --model "$model" --backend "$backend_list" --skip-unavailable \
        --durations "$durations" --batch "$batch" --repeats "$repeats" --warmup 1 \
        --video-size "$video_size" \
        --flops-presets tiny,small_16k,small_44k,medium_44k,large_44k,large_44k_v2 \
        --cache-dir "$work/cache" --json "$out/rtf-$preset.json"
    # video preprocessing on the GPU path: the CPU side against decoding, the device-side
    # convert + resize of one window, end to end with and without the overlap (#12)
    video_backend=${backends[-1]}
    [[ $has_ort_cuda == 1 && $has_gpu == 1 ]] && video_backend=ort-cuda
    python "$here/video.py" --model "$model" --backend "$video_backend" --synthetic 22 \
        --runs "$repeats" --json "$out/video-$preset.json"
done
echo "gpu.sh: results in $out"
