"""Inference without sockets: the artifact (`manifest` reads, `artifact` verifies with the probe),
the engine (the only importer of onnxruntime / OpenVINO), post-processing (pure numpy) and the
immutable active member set (`ensemble`). Imports no other room of `elit_stream`."""
