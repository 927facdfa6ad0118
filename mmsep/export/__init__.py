"""torch -> ONNX per stage, graph checks, ONNX Runtime parity, TensorRT engines, manifest."""
