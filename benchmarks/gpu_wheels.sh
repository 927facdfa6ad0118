#!/usr/bin/env bash
# Wheels that mmsep needs on the H200 machine and its image lacks (it reaches no package
# registry; KINDS.md in the device tool lists what it has): PyAV, soundfile (+ cffi, which it
# loads libsndfile with and the image lacks), soxr, open_clip and ftfy (+ wcwidth). Downloaded
# here for its Python (3.12, x86-64) into the git-ignored folder .gpuwheels/ (about 40 MB: it
# travels alone, not with a part of onnxruntime-gpu), with
# .gpuwheels/install.sh, which on that machine installs them into /tmp/gpuwheels and puts that
# first on PYTHONPATH:
#   call with .gpuwheels:  bash .gpuwheels/install.sh
#   later calls:           export PYTHONPATH=/tmp/gpuwheels${PYTHONPATH:+:$PYTHONPATH}
# onnxruntime-gpu comes separately (../shared/gpu/pack-ort-gpu.sh). BENCHMARKS.md ("GPU run")
# gives the whole sequence of calls.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12; run in the repository root)
set -euo pipefail
version=${1:-3.12}
root=$(git rev-parse --show-toplevel)
cd "$root"
dest=.gpuwheels
rm -rf "$dest"
mkdir -p "$dest"
grep -qx "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" \
    "av>=12" "soundfile>=0.12" "soxr>=0.3" "open_clip_torch>=2.24" "ftfy>=6.0" wcwidth \
    cffi pycparser
cat > "$dest/install.sh" <<'INSTALL'
# run on the GPU machine in the repository root, with .gpuwheels carried
python3 -m pip install -q --no-deps --no-index --target /tmp/gpuwheels .gpuwheels/*.whl
export PYTHONPATH=/tmp/gpuwheels${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import av, soundfile, soxr, open_clip; print('wheels:', av.__version__, soundfile.__version__, soxr.__version__, open_clip.__version__)"
INSTALL
du -sh "$dest"
ls "$dest"
