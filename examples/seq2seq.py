"""Encoder-decoder with attention on pyseqk: rewrite dates into ISO form.

    python examples/seq2seq.py [--attention bahdanau|luong] [--cell gru|lstm] [--steps N]
                               [--device cpu|cuda] [--seed S]

The task is generated here: a date between 1950 and 2049 in one of seven human formats
("march 5, 1998", "05/03/1998", "5.3.1998", ...) goes in, "1998-03-05" comes out.
The encoder is a recurrent layer (pyseqk.nn.GRU / LSTM when this pyseqk has them, torch.nn's
otherwise) over the padded characters; the decoder is a pyseqk GRUCell / LSTMCell stepped in a
loop with pyseqk attention (BahdanauAttention, or LuongAttention "general") over the encoder
outputs, the padding masked with key_padding_mask. Training uses teacher forcing; evaluation
decodes greedily and counts a held-out date correct only if all 10 characters are. The last line
printed is `accuracy: <fraction>`."""
from __future__ import annotations

import argparse
import datetime
import random
import time

import torch
from torch import nn

import pyseqk

try:  # pyseqk's sequence layers (drop-ins for torch.nn's); older pyseqk: torch.nn's own
    from pyseqk.nn import GRU, LSTM
except ImportError:
    from torch.nn import GRU, LSTM

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
SRC_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz ,/.-"
TGT_CHARS = "0123456789-"
PAD, BOS = 0, len(TGT_CHARS) + 1  # source index 0 is padding; target tokens 1..11, BOS 12
TGT_LEN = 10                      # YYYY-MM-DD


def render(d: datetime.date, rng: random.Random) -> str:
    m = MONTHS[d.month - 1]
    day = str(d.day) if rng.random() < 0.5 else f"{d.day:02d}"
    fmt = rng.randrange(7)
    if fmt == 0:
        return f"{day} {m} {d.year}"
    if fmt == 1:
        return f"{day} {m[:3]} {d.year}"
    if fmt == 2:
        return f"{m} {day}, {d.year}"
    if fmt == 3:
        return f"{m[:3]} {day} {d.year}"
    if fmt == 4:
        return f"{d.day:02d}/{d.month:02d}/{d.year}"
    if fmt == 5:
        return f"{d.year}.{d.month:02d}.{d.day:02d}"
    return f"{day}.{d.month}.{d.year}"


def make_data(n: int, seed: int):
    """(src [n, S] int64 padded with 0, lengths [n], tgt [n, 10] int64 in 1..11)."""
    rng = random.Random(seed)
    start = datetime.date(1950, 1, 1).toordinal()
    span = datetime.date(2049, 12, 31).toordinal() - start
    srcs, tgts = [], []
    for _ in range(n):
        d = datetime.date.fromordinal(start + rng.randrange(span + 1))
        srcs.append([SRC_CHARS.index(c) + 1 for c in render(d, rng)])
        tgts.append([TGT_CHARS.index(c) + 1 for c in d.isoformat()])
    lengths = torch.tensor([len(s) for s in srcs])
    src = torch.zeros(n, int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(srcs):
        src[i, : len(s)] = torch.tensor(s)
    return src, lengths, torch.tensor(tgts)


class Seq2seq(nn.Module):
    def __init__(self, hidden: int, cell: str, attention: str):
        super().__init__()
        self.cell_kind = cell
        self.src_emb = nn.Embedding(len(SRC_CHARS) + 1, hidden, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(BOS + 1, hidden)
        self.encoder = (GRU if cell == "gru" else LSTM)(hidden, hidden, batch_first=True)
        # The decoder's input is the previous character and the previous context (input feeding).
        cell_cls = pyseqk.nn.GRUCell if cell == "gru" else pyseqk.nn.LSTMCell
        self.decoder = cell_cls(2 * hidden, hidden)
        self.attention = (pyseqk.nn.BahdanauAttention(hidden) if attention == "bahdanau"
                          else pyseqk.nn.LuongAttention(hidden, score="general"))
        self.out = nn.Linear(2 * hidden, len(TGT_CHARS) + 1)

    def encode(self, src, lengths):
        keys, _ = self.encoder(self.src_emb(src))          # [B, S, H]; padding steps masked below
        pad = src == PAD                                    # [B, S]
        last = keys[torch.arange(src.shape[0], device=src.device), lengths - 1]  # [B, H]
        state = last if self.cell_kind == "gru" else (last, torch.zeros_like(last))
        return keys, pad, state

    def step(self, y_prev, context, state, keys, pad, uk):
        x = torch.cat([self.tgt_emb(y_prev), context], dim=1)
        state = self.decoder(x, state)
        h = state if self.cell_kind == "gru" else state[0]
        if uk is None:
            context, _ = self.attention(h.unsqueeze(1), keys, key_padding_mask=pad)
        else:
            context, _ = self.attention(h.unsqueeze(1), keys, key_padding_mask=pad,
                                        projected_keys=uk)
        context = context.squeeze(1)
        return self.out(torch.cat([h, context], dim=1)), context, state

    def forward(self, src, lengths, tgt=None):
        """Teacher-forced logits [B, 10, V] when tgt is given, greedy predictions [B, 10] else."""
        keys, pad, state = self.encode(src, lengths)
        # Bahdanau: Ua(keys) once per sequence, not at each of the 10 steps
        uk = self.attention.project_keys(keys) if hasattr(self.attention, "project_keys") else None
        B = src.shape[0]
        y = torch.full((B,), BOS, dtype=torch.long, device=src.device)
        context = keys.new_zeros(B, keys.shape[2])
        outs = []
        for t in range(TGT_LEN):
            logits, context, state = self.step(y, context, state, keys, pad, uk)
            outs.append(logits)
            y = tgt[:, t] if tgt is not None else logits.argmax(1)
        logits = torch.stack(outs, 1)
        return logits if tgt is not None else logits.argmax(2)


def accuracy(model, data, batch=500):
    src, lengths, tgt = data
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, src.shape[0], batch):
            pred = model(src[i:i + batch], lengths[i:i + batch])
            correct += (pred == tgt[i:i + batch]).all(1).sum().item()
    model.train()
    return correct / src.shape[0]


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention", choices=["bahdanau", "luong"], default="bahdanau")
    ap.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: these matrices are small, and on a shared "
                         "machine two threads waiting on each other at every op cost 10x)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = Seq2seq(args.hidden, args.cell, args.attention).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(args.steps, 1),
                                                pct_start=0.15)
    train = make_data(args.steps * args.batch_size, args.seed + 1)
    test = tuple(t.to(device) for t in make_data(args.test_size, args.seed + 1_000_003))
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.time()
    for step in range(args.steps):
        sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
        src, lengths, tgt = (t[sl].to(device) for t in train)
        src = src[:, : int(lengths.max())]
        logits = model(src, lengths, tgt)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.steps // 6) == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f} s", flush=True)
    acc = accuracy(model, test)
    src, lengths, _ = (t[:3] for t in test)
    for s, n, p in zip(src, lengths, model.eval()(src, lengths)):
        text = "".join(SRC_CHARS[i - 1] for i in s[:n].tolist())
        print(f"  {text!r:>22} -> {''.join(TGT_CHARS[i - 1] for i in p.tolist())}")
    print(f"accuracy: {acc:.2f}")
    return acc


if __name__ == "__main__":
    main()
