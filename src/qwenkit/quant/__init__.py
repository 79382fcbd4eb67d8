"""Weight quantization: the shared QuantizedWeight form, GPTQ/AWQ checkpoint formats, kernels, quantizers."""

from qwenkit.quant.weights import QuantizedWeight

__all__ = ["QuantizedWeight"]
