"""Latency benchmarks of the exported landmark models (eager, TorchScript, ONNX Runtime; CPU and CUDA)
and of the served TorchServe endpoint. Entry point: ``python -m benchmarks.run`` (``make bench``)."""
