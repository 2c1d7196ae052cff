"""The Wav2Lip engine: the published network and its checkpoints (``model``), the engine that
runs it over an avatar (``engine``), and its ONNX Runtime back end on the CPU (``onnx_backend``).
Importing any of these imports torch."""
