"""The inference contract of a landmark model: decoding and preprocessing, the class table and
locations, the model-metadata schema, run-folder files, runners (ONNX Runtime, TorchScript), the
predictor, argument types and atomic file writing.

Training, the TorchServe handler, the app and the benchmarks import this package; it imports none
of them, and nothing here imports torch at module import (only the TorchScript runner and the
checkpoint reader do, when called), so an ONNX-only consumer never loads torch. The model archive
ships this package whole.
"""
