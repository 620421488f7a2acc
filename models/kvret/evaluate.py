#!/usr/bin/python3
"""Evaluate a kvret checkpoint: held-out bits per byte, the copy test, task accuracies.

Usage: evaluate.py CHECKPOINT [--length 2048] [--samples 8] [--text models/kvret/eval.txt]
CHECKPOINT is a llama2.c model.bin (as exported) or a training checkpoint ckpt.pt.

Task accuracy is exact match of greedy decoding, computed with teacher forcing:
greedy decoding reproduces the answer and its closing newline exactly if and
only if, given the right prefix, the argmax at every answer position is the
right byte; so one forward pass per sample decides it.
The copy test: a 500-byte span of held-out text after 500 bytes of other
held-out text, then the same span again; bits per byte of each occurrence.
"""
import argparse, json, math, os, random, sys
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks
from model import Model, load_bin


@torch.no_grad()
def bits_per_byte(model, text, T, windows):
    tot, n = 0.0, 0
    for i in range(0, min(len(text) - T - 1, windows * T), T):
        row = torch.tensor(list(text[i:i + T + 1]), dtype=torch.long)[None]
        tot += F.cross_entropy(model(row[:, :-1])[0], row[0, 1:], reduction="sum").item()
        n += T
    return tot / n / math.log(2)


@torch.no_grad()
def copy_test(model, text, rng, n=4, span=500, prefix=500):
    """Mean bits per byte of the first and of the second occurrence of a span."""
    first = second = 0.0
    for _ in range(n):
        pre, s = tasks.filler(rng, text, prefix), tasks.filler(rng, text, span)
        row = torch.tensor(list(pre + s + s), dtype=torch.long)[None]
        nll = F.cross_entropy(model(row[:, :-1])[0], row[0, 1:], reduction="none")
        first += nll[prefix - 1:prefix - 1 + span].mean().item()
        second += nll[prefix + span - 1:prefix + 2 * span - 1].mean().item()
    return first / n / math.log(2), second / n / math.log(2)


@torch.no_grad()
def induction_probe(model, rng, length, n=8):
    """Mean bits per byte of the first and of the second occurrence of a random printable
    string of length/3 bytes set at random offsets in a row of random printable bytes
    (length bytes): copying at the row length being trained, content-based (the offset
    varies), where the copy test needs 1500 bytes of context."""
    alpha = tasks.PRINTABLE
    first = second = 0.0
    for _ in range(n):
        k = length // 3
        pre, gap = rng.randint(0, length // 6), rng.randint(0, length // 6)
        r = lambda m: bytes(rng.choice(alpha) for _ in range(m))
        s = r(k)
        b = r(pre) + s + r(gap) + s
        b += r(length - len(b))
        row = torch.tensor(list(b), dtype=torch.long)[None]
        nll = F.cross_entropy(model(row[:, :-1])[0], row[0, 1:], reduction="none")
        p1 = pre + k + gap  # target index t is nll[t - 1]; the first byte of each occurrence is unpredictable
        first += nll[pre:pre + k - 1].mean().item()
        second += nll[p1:p1 + k - 1].mean().item()
    return first / n / math.log(2), second / n / math.log(2)


@torch.no_grad()
def task_accuracy(model, text, rng, length, n, names=tasks.TASKS):
    """Per task, the fraction of n samples at `length` bytes answered exactly (greedy)."""
    acc = {}
    for name in names:
        ok = 0
        for _ in range(n):
            s = tasks.make(name, rng, text, length)
            b = s.bytes()
            row = torch.tensor(list(b), dtype=torch.long)[None]
            pred = model(row[:, :-1])[0].argmax(-1)
            k = len(s.answer) + 1  # the answer and its newline
            ok += bool((pred[-k:] == row[0, -k:]).all())
        acc[name] = ok / n
    return acc


def load(path):
    if path.endswith(".pt"):
        ck = torch.load(path, map_location="cpu")
        model = Model(ck["cfg"])
        model.load_state_dict(ck["model"])
        return model, ck["cfg"].get("seq_len", 2048)
    return load_bin(path)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=8, help="per task")
    p.add_argument("--copies", type=int, default=4, help="spans in the copy test")
    p.add_argument("--bpb-windows", type=int, default=4)
    p.add_argument("--text", default=os.path.join(here, "eval.txt"))
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, seq_len = load(a.checkpoint)
    model.eval()
    text = open(a.text, "rb").read()
    rng = random.Random(a.seed)
    out = {"checkpoint": a.checkpoint, "length": a.length, "samples_per_task": a.samples}
    out["bits_per_byte"] = bits_per_byte(model, text, min(1024, a.length), a.bpb_windows)
    out["copy_first_bpb"], out["copy_second_bpb"] = copy_test(model, text, rng, a.copies)
    out["tasks"] = task_accuracy(model, text, rng, a.length, a.samples)
    out["mean"] = sum(out["tasks"].values()) / len(out["tasks"])
    print(json.dumps(out, indent=1))
