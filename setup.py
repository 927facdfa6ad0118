from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("mmsep/__init__.py").read_text().split("\n\n", 1)[1], version)

setup(
    name="mmsep",
    version=version["__version__"],
    description="Deployment package for MMAudioSep: video/text-queried sound separation "
                "with ONNX Runtime and TensorRT",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mmsep", "mmsep.*"]),
    package_data={"mmsep.runtime": ["data/*"], "mmsep.export": ["data/*.json"],
                  "mmsep.models": ["data/*.json"]},
    # The runtime needs no torch.
    install_requires=[
        "numpy>=1.24",
        "click>=8.0",
        "tqdm>=4.60",
        "regex>=2022.1",
        "ftfy>=6.0",
        "onnxruntime>=1.18",  # or onnxruntime-gpu, which provides the same module
        "av>=12",
        "soundfile>=0.12",
        "soxr>=0.3",
        "Pillow>=9.1",
        # builds the small frame-resize graph that GPU backends run (runtime/resize.py); torch-free
        "onnx>=1.16",
    ],
    # each through mmsep.console, so that an interrupt while the program imports is one line
    entry_points={"console_scripts": ["mmsep-export=mmsep.console:export_main",
                                     "mmsep-run=mmsep.console:run_main",
                                     "mmsep-batch=mmsep.console:batch_main",
                                     "mmsep-serve=mmsep.console:serve_main",
                                     "mmsep-finetune=mmsep.console:finetune_main"]},
    extras_require={
        # Exporting needs the PyTorch definitions. On CPU-only machines install the pinned torch
        # first (README) so that pip does not pull a multi-GB CUDA build to satisfy this range.
        "export": [
            "torch>=2.4",
            "open_clip_torch>=2.24",
            "safetensors>=0.4",
            "onnx>=1.16",
            "onnxscript>=0.1",
            "onnxruntime>=1.18",
        ],
        # the runtime's TensorRT backend (NVIDIA GPU machines); cuda-python captures the
        # denoiser loop as a CUDA graph and is optional
        "tensorrt": [
            "tensorrt>=10",
            "pycuda>=2022.1",
            "cuda-python>=12",
        ],
        # mmsep-batch --ray (a pool of Ray actors) and mmsep-serve (Ray Serve; multipart form uploads);
        # mmsep-batch without --ray needs none of it
        "ray": [
            "ray[serve]>=2.60,<3",  # verified with 2.60.0
            "python-multipart>=0.0.20",  # verified with 0.0.34
        ],
        # the figure of benchmarks/finetune_tiny.py (the fine-tuning proof run)
        "bench": ["matplotlib>=3.5"],
        # independent references used by the tests: librosa's mel filters, scipy's FIR design
        "test": [
            "pytest>=7",
            "librosa>=0.10",
            "scipy>=1.10",
        ],
    },
)
