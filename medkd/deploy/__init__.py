"""Ship a trained network: an ONNX bundle (``medkd export``) and a predictor that runs it without PyTorch.

``bundle``  the bundle's files, plan and checksums (torch-free);
``ops``     the preprocessing, sliding window and mapping back of :mod:`medkd.engine.inference`, in numpy;
``runtime`` :class:`~medkd.deploy.runtime.BundlePredictor`: onnxruntime + ``ops`` (torch-free);
``export``  PyTorch network -> ``model.onnx``, checked against PyTorch, timed;
``quantize`` fp32 ``model.onnx`` -> static int8 (QDQ, calibrated as the predictor feeds it) or fp16 (torch-free);
``card``    the bundle's model card (``README.md``).

This file imports nothing, so that ``import medkd.deploy.runtime`` works where PyTorch is not installed.
"""
