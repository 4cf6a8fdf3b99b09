"""Drop-in replacements for torch.nn modules."""
from .convert import convert
from .rnn import GRUCell, LSTMCell, RNNCell
from .attention import MultiheadAttention
from .transformer import (PositionalEncoding, Transformer, TransformerDecoder, TransformerDecoderLayer,
                          TransformerEncoder, TransformerEncoderLayer)

__all__ = ["RNNCell", "LSTMCell", "GRUCell", "convert"]
__all__ += ["MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
            "TransformerEncoder", "TransformerDecoder", "Transformer", "PositionalEncoding"]
