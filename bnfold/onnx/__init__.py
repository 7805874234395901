"""The ONNX front-end: load, find, fold (via onnx-graphsurgeon), save. Never imports torch."""
