"""Drop-in replacements for torch.nn modules."""
from .convert import convert
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = ["RNNCell", "LSTMCell", "GRUCell", "RNN", "LSTM", "GRU", "convert"]

# seq2seq attention (no torch.nn counterpart: pyseqk.convert leaves models alone here)
from .seq2seq import BahdanauAttention, LuongAttention  # noqa: E402

__all__ += ["LuongAttention", "BahdanauAttention"]
