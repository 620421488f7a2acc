#!/usr/bin/python3
"""Induction diagnostic: does a small kvret-shaped model learn to copy, and how fast?

Trains model.Model (the code train_kvret.py trains: RoPE, GQA, mask, loss
shift) on rows of one kind and prints, every --every steps, bits per byte on
the first and on the second occurrence of a repeated random string set at
random offsets in a row of random bytes (all 256 values, and letters and
digits only), plus evaluate.copy_test on held-out source. Kinds:
  pure         a random string of T/2 letters and digits, then the same string
               again: the repeat is always T/2 back, so a positional head copies
  shift:A      random prefix, s (T/3), random gap, s: content-based copying;
               A = 256 (any byte), print (printable) or alnum
  period:A     a random string of random length repeated to fill the row
  copy         tasks.copy_row (train_kvret.py's dense copying rows)
  randrep      tasks.random_repeat_row
  repeat       tasks.repeat_row
--abspos (learned absolute positions instead of RoPE) and --qk-std (larger
wq, wk initialisation) are controls. Findings: README.md, "Why the first run
did not copy".
"""
import argparse, glob, math, os, random, sys, time
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks, evaluate
from model import Model

p = argparse.ArgumentParser()
p.add_argument("--kind", default="pure")
p.add_argument("--dim", type=int, default=128)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--heads", type=int, default=2)
p.add_argument("--kv-heads", type=int, default=1)
p.add_argument("--len", type=int, default=256)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--warmup", type=int, default=50)
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--every", type=int, default=50)
p.add_argument("--minutes", type=float, default=15)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--qk-std", type=float, default=0.0, help="re-initialise wq and wk with this std (0: model.py's)")
p.add_argument("--abspos", action="store_true", help="control: learned absolute positions instead of RoPE")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)

files = sorted(glob.glob("/usr/lib/python3.11/**/*.py", recursive=True))
files = [f for f in files if "/test" not in f and os.path.getsize(f) > 2000]
random.Random(7).shuffle(files)
n_eval = max(8, len(files) // 20)
load = lambda fs: b"".join(open(f, "rb").read() + b"\n\n" for f in fs)
train_text, eval_text = load(files[2 * n_eval:]), load(files[:n_eval])
ALNUM = b"abcdefghijklmnopqrstuvwxyz0123456789"


def pure(rng, T):
    h = T // 2
    s = bytes(rng.choice(ALNUM) for _ in range(h))
    return s + s + bytes(rng.choice(ALNUM) for _ in range(T + 1 - 2 * h))


ALPHA = {"256": bytes(range(256)), "print": bytes(range(32, 127)) + b"\n", "alnum": ALNUM}


def shifted(rng, T, alpha):
    """Random prefix, s, random gap, s, random tail: the repeat is at a random offset,
    so no fixed look-back position predicts it. Returns the row and where both copies start."""
    n = T // 3
    pre, gap = rng.randint(0, T // 6), rng.randint(0, T // 6)
    r = lambda k: bytes(rng.choice(alpha) for _ in range(k))
    s = r(n)
    row = r(pre) + s + r(gap) + s
    return row + r(T + 1 - len(row)), pre, pre + n + gap, n


def periodic(rng, T, alpha):
    """A random string of random length 8..T/4, repeated (after a random prefix) to fill the row."""
    p, pre = rng.randint(8, T // 4), rng.randint(0, T // 8)
    s = bytes(rng.choice(alpha) for _ in range(p))
    row = bytes(rng.choice(alpha) for _ in range(pre)) + s * (T // p + 2)
    return row[:T + 1]


def make(rng, T, text):
    if a.kind.startswith("period:"):
        return periodic(rng, T, ALPHA[a.kind[7:]])
    if a.kind.startswith("shift:"):
        return shifted(rng, T, ALPHA[a.kind[6:]])[0]
    if a.kind == "pure":
        return pure(rng, T)
    if a.kind == "pureprint":  # pure, over printable bytes
        h = T // 2
        s = bytes(rng.choice(tasks.PRINTABLE) for _ in range(h))
        return s + s + bytes(rng.choice(tasks.PRINTABLE) for _ in range(T + 1 - 2 * h))
    if a.kind == "copy":
        return tasks.copy_row(rng, text, T + 1)
    if a.kind.startswith("mix"):  # mixP: pureprint with probability P/100, else copy_row
        if rng.random() < int(a.kind[3:]) / 100:
            h = T // 2
            s = bytes(rng.choice(tasks.PRINTABLE) for _ in range(h))
            return s + s + bytes(rng.choice(tasks.PRINTABLE) for _ in range(T + 1 - 2 * h))
        return tasks.copy_row(rng, text, T + 1)
    if a.kind == "randrep":
        return tasks.random_repeat_row(rng, text, T + 1)
    return tasks.repeat_row(rng, text, T + 1, rng.randint(16, min(512, T // 3)))


cfg = {"dim": a.dim, "hidden_dim": 3 * a.dim, "n_layers": a.layers, "n_heads": a.heads,
       "n_kv_heads": a.kv_heads, "head_dim": a.dim // a.heads, "vocab_size": 256}
model = Model(cfg)
if a.qk_std:
    for b in model.blocks:
        torch.nn.init.normal_(b.wq.weight, std=a.qk_std)
        torch.nn.init.normal_(b.wk.weight, std=a.qk_std)
if a.abspos:
    import model as model_mod
    model_mod.rope = lambda x, cos, sin: x
    model.pos = torch.nn.Parameter(torch.randn(2048, a.dim) * 0.02)
    model.emb_fwd = model.emb.forward
    model.emb.forward = lambda idx: model.emb_fwd(idx) + model.pos[:idx.shape[1]]
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
rng = random.Random(a.seed)
held = {al: [shifted(random.Random(1000 + i), a.len, ALPHA[al]) for i in range(8)] for al in ("256", "alnum")}


@torch.no_grad()
def probe():
    model.eval()
    out = []
    for al, rows in held.items():
        x = torch.tensor([list(r[0]) for r in rows])
        nll = F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1), reduction="none").view(len(rows), -1)
        # target t is nll[t-1]; skip the first byte of each copy (unpredictable)
        f = sum(nll[i, p0:p0 + n - 1].mean().item() for i, (_, p0, p1, n) in enumerate(rows)) / len(rows)
        s2 = sum(nll[i, p1:p1 + n - 1].mean().item() for i, (_, p0, p1, n) in enumerate(rows)) / len(rows)
        out += [f / math.log(2), s2 / math.log(2)]
    c1, c2 = evaluate.copy_test(model, eval_text, random.Random(12345), 2)
    model.train()
    return out + [c1, c2]


t0 = time.time()
print(f"params {sum(q.numel() for q in model.parameters())} kind {a.kind} T {a.len} B {a.batch} lr {a.lr}", flush=True)
for step in range(a.steps + 1):
    if step % a.every == 0:
        r = probe()
        print(f"step {step:5d} min {(time.time() - t0) / 60:5.1f} shift256 {r[0]:.2f} -> {r[1]:.2f}  "
              f"shiftalnum {r[2]:.2f} -> {r[3]:.2f}  copytest {r[4]:.2f} -> {r[5]:.2f}", flush=True)
        if (time.time() - t0) / 60 > a.minutes:
            break
    for g in opt.param_groups:
        g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
    x = torch.tensor([list(make(rng, a.len, train_text)) for _ in range(a.batch)])
    loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
