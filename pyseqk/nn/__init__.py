"""Drop-in replacements for torch.nn modules, and the seq2seq attention modules (Luong,
Bahdanau), which have no torch.nn counterpart: pyseqk.convert leaves models alone there."""
from .attention import MultiheadAttention
from .convert import convert
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .seq2seq import BahdanauAttention, LuongAttention
from .transformer import (PositionalEncoding, Transformer, TransformerDecoder,
                          TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer)

__all__ = ["RNNCell", "LSTMCell", "GRUCell", "RNN", "LSTM", "GRU", "MultiheadAttention",
           "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerDecoder", "Transformer", "PositionalEncoding", "LuongAttention",
           "BahdanauAttention", "convert"]
