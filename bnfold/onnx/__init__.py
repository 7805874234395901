"""The ONNX front-end: load, plan (one rule per pattern, `rules/`), apply via onnx-graphsurgeon, save. Never imports torch."""
