"""Drop-in replacements for torch.nn modules."""
from .convert import convert
from .rnn import GRUCell, LSTMCell, RNNCell

__all__ = ["RNNCell", "LSTMCell", "GRUCell", "convert"]
