"""The kvret model in torch, and its llama2.c (version 0) export and import.

Llama conventions as examples/engine reads them: RMSNorm (eps 1e-5), RoPE on
interleaved pairs (2i, 2i+1) with theta 10000, grouped-query attention, SwiGLU,
output classifier shared with the token embedding (positive vocab in the header).
"""
import math, os, struct
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROPE = 8192  # RoPE tables are computed for positions up to this (evaluation beyond training)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, H, KVH, HD, HID = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], cfg["hidden_dim"]
        self.H, self.KVH, self.HD = H, KVH, HD
        self.an, self.fn = RMSNorm(D), RMSNorm(D)
        self.wq = nn.Linear(D, H * HD, bias=False)
        self.wk = nn.Linear(D, KVH * HD, bias=False)
        self.wv = nn.Linear(D, KVH * HD, bias=False)
        self.wo = nn.Linear(H * HD, D, bias=False)
        self.w1 = nn.Linear(D, HID, bias=False)
        self.w2 = nn.Linear(HID, D, bias=False)
        self.w3 = nn.Linear(D, HID, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        h = self.an(x)
        q = rope(self.wq(h).view(B, T, self.H, self.HD), cos, sin)
        k = rope(self.wk(h).view(B, T, self.KVH, self.HD), cos, sin)
        v = self.wv(h).view(B, T, self.KVH, self.HD)
        rep = self.H // self.KVH
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = F.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.HD)) + mask, dim=-1)
        x = x + self.wo((att @ v).transpose(1, 2).reshape(B, T, -1))
        h = self.fn(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def rope(x, cos, sin):  # x: B,T,h,hd; pairs (2i, 2i+1) rotated by pos * theta^(-2i/hd)
    B, T, h, hd = x.shape
    xr = x.reshape(B, T, h, hd // 2, 2)
    a, b = xr[..., 0], xr[..., 1]
    c, s = cos[:T].view(1, T, 1, -1), sin[:T].view(1, T, 1, -1)
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).reshape(B, T, h, hd)


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, L = cfg["dim"], cfg["n_layers"]
        self.emb = nn.Embedding(256, D)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(L))
        self.norm = RMSNorm(D)
        hd = cfg["head_dim"]
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.outer(torch.arange(MAX_ROPE, dtype=torch.float64), freqs)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)
        self._masks = {}
        for n, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * L) if n.endswith(("wo.weight", "w2.weight")) else 1))

    def mask(self, T):
        if T not in self._masks:
            self._masks = {T: torch.full((T, T), float("-inf")).triu(1)}
        return self._masks[T]

    def forward(self, idx):
        T = idx.shape[1]
        x, m = self.emb(idx), self.mask(T)
        for b in self.blocks:
            x = b(x, self.cos, self.sin, m)
        return self.norm(x) @ self.emb.weight.t()


def _tensors(model):
    """The tensors in llama2.c file order."""
    bl = model.blocks
    out = [model.emb.weight] + [b.an.w for b in bl]
    for name in ("wq", "wk", "wv", "wo"):
        out += [getattr(b, name).weight for b in bl]
    out += [b.fn.w for b in bl]
    for name in ("w1", "w2", "w3"):
        out += [getattr(b, name).weight for b in bl]
    return out + [model.norm.w]


def export(model, path, seq_len):
    """Write a llama2.c version-0 checkpoint (atomically: temporary file, then rename)."""
    c = model.cfg
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<7i", c["dim"], c["hidden_dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], 256, seq_len))
        for t in _tensors(model):
            f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())
        f.write(model.cos[:seq_len].numpy().astype("<f4").tobytes())  # legacy freq_cis tables (readers compute RoPE)
        f.write(model.sin[:seq_len].numpy().astype("<f4").tobytes())
    os.replace(tmp, path)


def load_bin(path):
    """A Model from a llama2.c checkpoint written by export()."""
    hdr = np.fromfile(path, dtype="<i4", count=7)
    D, HID, L, H, KVH, V, T = (int(x) for x in hdr)
    model = Model({"dim": D, "hidden_dim": HID, "n_layers": L, "n_heads": H, "n_kv_heads": KVH, "head_dim": D // H})
    raw = np.fromfile(path, dtype="<f4", offset=28)
    o = 0
    with torch.no_grad():
        for t in _tensors(model):
            n = t.numel()
            t.copy_(torch.from_numpy(raw[o:o + n].copy()).view_as(t))
            o += n
    return model, T
