"""Typed export failures; every message names the stage (and tensor or node) concerned."""


class ExportError(RuntimeError):
    """An export step failed for a reason inside the package or the model."""


class UsageError(ValueError):
    """Bad input from the user (paths, options, checkpoints): exit code 2 at the CLI."""


class GraphCheckError(ExportError):
    """An exported graph does not satisfy its stage contract."""


class UnsupportedOperatorError(GraphCheckError):
    """A graph uses an operator the targeted TensorRT ONNX parser does not support."""


class ParityError(ExportError):
    """A backend's outputs differ from the PyTorch module beyond the stage tolerance."""
