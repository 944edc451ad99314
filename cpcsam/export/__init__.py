"""ONNX export of CPC-SAM (image encoder; CaPL + prompt encoder + mask decoder) and onnxruntime inference."""
