"""Drop-in replacements for torch.nn modules."""
from .rnn import GRUCell, LSTMCell, RNNCell

__all__ = ["RNNCell", "LSTMCell", "GRUCell"]
