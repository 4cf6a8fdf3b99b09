"""A small Transformer built from pyseqk layers learns to reverse digit sequences.

The data is generated here: sources are 4 to 10 random digits, padded on the left; the target
is the source reversed, then an end token. The model is nn.Embedding -> pyseqk.nn.PositionalEncoding ->
pyseqk.nn.Transformer (encoder and decoder, padding and causal masks) -> a Linear head, trained
with teacher forcing and evaluated by greedy decoding on held-out sequences. The last line
printed is the exact-sequence accuracy, e.g. ``accuracy: 0.97``.

    python examples/transformer.py [--steps 400] [--device cpu] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyseqk

DIGITS, PAD, BOS, EOS = 10, 10, 11, 12
VOCAB = 13
MIN_LEN, MAX_LEN = 4, 10


def make_batch(n: int, gen: torch.Generator, device: str):
    """src [n, MAX_LEN]: PAD then the digits (padded on the left, so that the last digit is
    always at the last position); tgt_in [n, MAX_LEN + 1] = BOS + reversed digits;
    tgt_out [n, MAX_LEN + 1] = reversed digits + EOS (PAD after, ignored by the loss)."""
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=gen)
    digits = torch.randint(0, DIGITS, (n, MAX_LEN), generator=gen)
    pos = torch.arange(MAX_LEN).unsqueeze(0)
    src = torch.where(pos >= MAX_LEN - lengths.unsqueeze(1), digits, PAD)
    # Target position i holds the i-th digit from the end: src position MAX_LEN - 1 - i.
    rev = torch.where(pos < lengths.unsqueeze(1), src.flip(1), PAD)
    tgt_out = torch.cat([rev, torch.full((n, 1), PAD)], 1)
    tgt_out[torch.arange(n), lengths] = EOS
    tgt_in = torch.cat([torch.full((n, 1), BOS), rev], 1)
    return src.to(device), tgt_in.to(device), tgt_out.to(device)


class Reverser(nn.Module):
    def __init__(self, d_model=64, nhead=4, layers=2, ff=128, dropout=0.1):
        super().__init__()
        self.d_model = d_model
        self.src_emb = nn.Embedding(VOCAB, d_model)
        self.tgt_emb = nn.Embedding(VOCAB, d_model)
        self.pos = pyseqk.nn.PositionalEncoding(d_model, dropout, max_len=64, batch_first=True)
        self.transformer = pyseqk.nn.Transformer(d_model, nhead, layers, layers, ff, dropout,
                                                 batch_first=True)
        self.head = nn.Linear(d_model, VOCAB)
        # Embeddings of std d^-1/2, scaled by d^1/2 in embed(): unit scale, like the encoding.
        # (nn.Embedding's N(0, 1) times d^1/2 would drown the positions, which reversing needs.)
        for emb in (self.src_emb, self.tgt_emb):
            nn.init.normal_(emb.weight, std=d_model ** -0.5)

    def embed(self, emb, tokens):
        return self.pos(emb(tokens) * math.sqrt(self.d_model))

    def encode(self, src):
        return self.transformer.encoder(self.embed(self.src_emb, src),
                                        src_key_padding_mask=src == PAD)

    def decode(self, tgt_in, memory, src_pad):
        T = tgt_in.shape[1]
        causal = pyseqk.nn.Transformer.generate_square_subsequent_mask(T, device=tgt_in.device)
        out = self.transformer.decoder(self.embed(self.tgt_emb, tgt_in), memory, tgt_mask=causal,
                                       tgt_is_causal=True, memory_key_padding_mask=src_pad)
        return self.head(out)

    def forward(self, src, tgt_in):
        return self.decode(tgt_in, self.encode(src), src == PAD)

    @torch.no_grad()
    def greedy(self, src):
        """Decode one token at a time, each step attending causally to what came before."""
        memory, src_pad = self.encode(src), src == PAD
        out = torch.full((src.shape[0], 1), BOS, device=src.device)
        for _ in range(MAX_LEN + 1):
            nxt = self.decode(out, memory, src_pad)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            if (out == EOS).any(1).all():
                break
        return out[:, 1:]


def exact_match(pred, tgt_out):
    """A sequence counts when every token up to and including EOS is right."""
    n = tgt_out.shape[1]
    pred = F.pad(pred, (0, max(0, n - pred.shape[1])), value=PAD)[:, :n]
    relevant = tgt_out != PAD
    return ((pred == tgt_out) | ~relevant).all(1).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps (batches)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--test", type=int, default=500, help="held-out sequences")
    # One thread by default: the matrices are small enough that a second one gains little, and
    # on a busy machine each OpenMP barrier that waits for a descheduled thread costs ms.
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    train_gen = torch.Generator().manual_seed(args.seed)
    test_gen = torch.Generator().manual_seed(args.seed + 10_000)  # a different stream
    model = Reverser().to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup = max(1, min(100, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    print(f"pyseqk backend: {pyseqk.backends.resolve(torch.device(args.device))}; "
          f"{sum(p.numel() for p in model.parameters())} parameters")

    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        src, tgt_in, tgt_out = make_batch(args.batch, train_gen, args.device)
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt_out.reshape(-1), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.1f}s", flush=True)

    model.eval()
    src, _, tgt_out = make_batch(args.test, test_gen, args.device)
    acc = exact_match(model.greedy(src), tgt_out)
    print(f"accuracy: {acc:.2f}")


if __name__ == "__main__":
    main()
