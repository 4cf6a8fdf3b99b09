"""pyseqk: fused kernels for recurrent and attention models, drop-in for torch.nn."""
from . import backends, functional, nn, reference
from .backends import BackendError, use_backend
from .nn.convert import convert

__version__ = "0.1.0"
__all__ = ["backends", "functional", "nn", "reference", "use_backend", "BackendError", "convert"]
