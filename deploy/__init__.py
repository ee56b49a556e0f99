"""Deployment: a checkpoint as a self-contained inference network, exported to ONNX and torch.export."""
