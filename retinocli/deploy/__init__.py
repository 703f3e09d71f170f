"""Serving a trained grader: export to ONNX (torch), ONNX metadata and runtime, predict (no torch)."""
