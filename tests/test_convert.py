"""pyseqk.convert swaps torch.nn's recurrent modules for pyseqk's in place: the same objects,
parameters, device, dtype and training mode; the same outputs and gradients; user subclasses
and other modules left alone."""
import copy
import pickle

import pytest
import torch

import pyseqk
from pyseqk.nn.convert import SWAPS


class UserLSTM(torch.nn.LSTM):
    """A user's subclass has its own forward: convert must leave it alone."""

    def forward(self, input, hx=None):
        out, hidden = super().forward(input, hx)
        return out * 2, hidden


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.lstm = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True,
                                  proj_size=2, dropout=0.3)
        self.gru = torch.nn.GRU(4, 5)
        self.blocks = torch.nn.ModuleList([torch.nn.RNN(5, 5, nonlinearity="relu", bias=False),
                                           torch.nn.RNN(5, 3)])
        self.cell = torch.nn.LSTMCell(3, 3)
        self.user = UserLSTM(4, 2)
        self.head = torch.nn.Linear(4 + 3 + 3 + 2, 1)

    def forward(self, x):  # x [B, T, 3]
        e = self.embed(x)
        a, _ = self.lstm(e)                      # [B, T, 4]
        g, _ = self.gru(e.transpose(0, 1))       # [T, B, 5]
        r = g
        for block in self.blocks:
            r, _ = block(r)                      # [T, B, 3]
        c, _ = self.cell(r[-1])                  # [B, 3]
        u, _ = self.user(e)                      # [B, T, 2] (batch_first=False: T is "batch")
        feats = torch.cat([a[:, -1], r[-1], c, u[:, -1]], 1)
        return self.head(feats)


def build(dtype=torch.float64):
    torch.manual_seed(0)
    return Model().to(dtype)


def test_swaps_cover_the_recurrent_modules():
    for tcls in (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU, torch.nn.RNNCell, torch.nn.LSTMCell,
                 torch.nn.GRUCell):
        pcls = SWAPS[tcls]
        assert issubclass(pcls, tcls) and pcls.__name__ == tcls.__name__
        assert pcls is getattr(pyseqk.nn, tcls.__name__)


def test_convert_in_place_keeps_state():
    model = build()
    model.eval()
    model.gru.train()  # a mixed training mode must survive
    before = {id(m): type(m) for m in model.modules()}
    params = {n: p for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    assert pyseqk.convert(model) is model
    assert type(model.lstm) is pyseqk.nn.LSTM and type(model.gru) is pyseqk.nn.GRU
    assert all(type(b) is pyseqk.nn.RNN for b in model.blocks)
    assert type(model.cell) is pyseqk.nn.LSTMCell
    assert type(model.user) is UserLSTM and type(model.embed) is torch.nn.Linear
    assert {id(m) for m in model.modules()} == set(before)  # the same objects
    for n, p in model.named_parameters():
        assert p is params[n] and p.dtype == torch.float64 and p.device.type == "cpu"
    for (n, a), b in zip(model.state_dict().items(), state.values()):
        assert torch.equal(a, b), n
    assert not model.training and not model.lstm.training and model.gru.training
    assert model.lstm.dropout == 0.3 and model.lstm.proj_size == 2 and model.lstm.batch_first
    assert repr(model.lstm) == repr(build().lstm)


@pytest.mark.parametrize("train", [False, True])
def test_converted_model_same_outputs_and_grads(train):
    ref, model = build(), pyseqk.convert(build())
    ref.train(train), model.train(train)
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    # dropout in the LSTM draws from the same RNG in the same order (padded input)
    torch.manual_seed(1)
    out_r = ref(x)
    torch.manual_seed(1)
    out_m = model(x)
    torch.testing.assert_close(out_m, out_r, atol=1e-11, rtol=1e-9)
    out_r.sum().backward()
    out_m.sum().backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-11, rtol=1e-9, msg=n)


def test_converted_model_state_dict_round_trip_and_pickle():
    model = pyseqk.convert(build())
    ref = build()
    ref.load_state_dict(model.state_dict())
    model.load_state_dict(ref.state_dict())
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.lstm) is pyseqk.nn.LSTM
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(x), model(x))
    deep = copy.deepcopy(model)
    torch.testing.assert_close(deep(x), model(x))


def test_convert_then_move_dtype():
    model = pyseqk.convert(build(torch.float32)).to(torch.float64)
    assert type(model.lstm) is pyseqk.nn.LSTM
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.eval()
    ref = build()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), atol=1e-11, rtol=1e-9)


def test_convert_a_bare_module_and_rejects_non_modules():
    lstm = torch.nn.LSTM(3, 4)
    assert pyseqk.convert(lstm) is lstm and type(lstm) is pyseqk.nn.LSTM
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        pyseqk.convert([lstm])


@pytest.mark.gpu
def test_convert_keeps_cuda_device():
    model = pyseqk.convert(build(torch.float32).cuda())
    assert all(p.is_cuda for p in model.parameters())
    ref = build(torch.float32).cuda()
    model.eval(), ref.eval()
    x = torch.randn(2, 4, 3, device="cuda")
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)
