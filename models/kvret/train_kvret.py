#!/usr/bin/python3
"""Train kvret: a small Llama-style byte-level model that retrieves from its context.

kvref (../kvref) learned Python source only and does not copy from its context.
kvret learns the same source mixed with rows that can only be predicted by
looking far back: the long-range tasks of tasks.py (the formats kvc-ruler
generates) and rows in which a span of text reappears. A length curriculum
takes it from 256-byte rows to 2048-byte rows.

Training is resumable: every --ckpt-minutes it writes (atomically) OUT/ckpt.pt
(model, optimizer, data and torch RNG states, step, minutes), OUT/model.bin
(llama2.c version 0, for examples/engine), OUT/config.json (the record) and
appends the evaluation to OUT/evals.jsonl. Restart with the same command plus
--resume. Needs Debian's python3-torch and python3-numpy, and OpenBLAS
(libopenblas0-pthread; without it torch falls back to reference BLAS, ~10x slower).

Usage: train_kvret.py [--out /work/kvret-train] [--corpus /usr/lib/python3.11] [--resume]
"""
import argparse, glob, json, math, os, random, signal, sys, time
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks
import evaluate
from model import Model, export

p = argparse.ArgumentParser()
p.add_argument("--out", default="/work/kvret-train")
p.add_argument("--corpus", default="/usr/lib/python3.11")
p.add_argument("--resume", action="store_true")
p.add_argument("--seed", type=int, default=1)
p.add_argument("--corpus-seed", type=int, default=7, help="file split; 7 is kvref's, so eval.txt is kvref's")
p.add_argument("--dim", type=int, default=256)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--kv-heads", type=int, default=2)
p.add_argument("--hidden", type=int, default=768)
p.add_argument("--phases", default="32:64:2000,64:32:1000,128:16:1000,256:8:1500,512:4:1500,1024:2:2000,2048:1:0",
               help="length:batch:steps,...; the last phase (steps 0) lasts to the end")
p.add_argument("--total-steps", type=int, default=15000)
p.add_argument("--decay-steps", type=int, default=1500, help="linear decay to 0 over the last N steps")
p.add_argument("--lr", type=float, default=1.5e-3)
p.add_argument("--warmup", type=int, default=100)
p.add_argument("--answer-weight", type=float, default=3.0, help="loss weight of answer bytes")
p.add_argument("--mix", default="plain:0.05,repeat:0.05,copy:0.20,tasks:0.70",
               help="row kinds after the warm-up phase (plain, repeat, randrep, copy); tasks takes what the others leave")
p.add_argument("--warm-steps", type=int, default=4000,
               help="steps from 0 that use --warm-mix: dense copying first, so that induction heads form")
p.add_argument("--warm-mix", default="copy:0.90,plain:0.10", help="row kinds of the warm-up phase")
p.add_argument("--ckpt-minutes", type=float, default=10)
p.add_argument("--first-ckpt-minutes", type=float, default=None, help="first checkpoint sooner (to test resuming)")
p.add_argument("--max-minutes", type=float, default=1e9, help="stop after this many minutes of this run")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
os.makedirs(args.out, exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))

# ---- corpus: Python standard library sources, split by file exactly as kvref's ----
files = sorted(glob.glob(os.path.join(args.corpus, "**/*.py"), recursive=True))
files = [f for f in files if "/test" not in f and os.path.getsize(f) > 2000]
random.Random(args.corpus_seed).shuffle(files)
n_eval = max(8, len(files) // 20)
eval_a, train_files = files[:n_eval], files[2 * n_eval:]
load = lambda fs: b"".join(open(f, "rb").read() + b"\n\n" for f in fs)
train_text, eval_text = load(train_files), load(eval_a)
with open(os.path.join(args.out, "eval.txt"), "wb") as f:
    f.write(eval_text)

phases = [tuple(int(x) for x in ph.split(":")) for ph in args.phases.split(",")]
parse_mix = lambda spec: {k: float(v) for k, v in (m.split(":") for m in spec.split(","))}
mixes = (parse_mix(args.warm_mix), parse_mix(args.mix))
KINDS = ("plain", "repeat", "randrep", "copy")
for m_ in mixes:
    assert set(m_) <= set(KINDS) | {"tasks"} and sum(v for k, v in m_.items() if k != "tasks") <= 1.0, f"bad mix {m_}"
mix_at = lambda step: mixes[0] if step < args.warm_steps else mixes[1]
def phase(step):
    s = step
    for T, B, n in phases:
        if n == 0 or s < n:
            return T, B
        s -= n
    return phases[-1][:2]

cfg = {"dim": args.dim, "hidden_dim": args.hidden, "n_layers": args.layers, "n_heads": args.heads,
       "n_kv_heads": args.kv_heads, "head_dim": args.dim // args.heads, "vocab_size": 256}
model = Model(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
rng = random.Random(args.seed)
torch.manual_seed(args.seed)
state = {"step": 0, "minutes": 0.0, "tokens": 0, "rows": {**{k: 0 for k in KINDS}, **{t: 0 for t in tasks.TASKS}},
         "longest": 0}
ckpt_path = os.path.join(args.out, "ckpt.pt")
if args.resume:
    ck = torch.load(ckpt_path, map_location="cpu")
    assert ck["cfg"]["dim"] == cfg["dim"] and ck["cfg"]["n_layers"] == cfg["n_layers"], "model shape differs from the checkpoint"
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    rng.setstate(ck["rng"])
    torch.set_rng_state(ck["torch_rng"])
    state = ck["state"]
    if "mix_history" not in state:  # checkpoints from before the record kept it
        state["mix_history"] = [[0, {k: float(v) for k, v in (m.split(":") for m in ck["args"]["mix"].split(","))}]]
    print(f"resumed at step {state['step']} ({state['minutes']:.1f} min)", flush=True)


def note_mix(step):
    """The record says which mix ran from which step."""
    h = state.setdefault("mix_history", [])
    if not h or h[-1][1] != mix_at(step):
        h.append([step, mix_at(step)])


note_mix(state["step"])
print(f"params {sum(p.numel() for p in model.parameters())}; train bytes {len(train_text)}, eval bytes {len(eval_text)}", flush=True)


def row(T, mix):
    """T+1 bytes and the per-target loss weights (answer bytes weigh more)."""
    u, kind = rng.random(), "tasks"
    for k in KINDS:
        if u < mix.get(k, 0.0):
            kind = k
            break
        u -= mix.get(k, 0.0)
    if kind == "tasks" and sum(v for k, v in mix.items() if k != "tasks") >= 1 - 1e-9:
        kind = [k for k in KINDS if mix.get(k, 0.0) > 0][-1]  # rounding left u just past 1: no tasks in this mix
    if kind == "plain":
        b = tasks.filler(rng, train_text, T + 1)
        w = [1.0] * T
    elif kind == "repeat":
        b = tasks.repeat_row(rng, train_text, T + 1, rng.randint(16, min(512, T // 3)))
        w = [1.0] * T
    elif kind == "randrep":
        b = tasks.random_repeat_row(rng, train_text, T + 1)
        w = [1.0] * T
    elif kind == "copy":
        b = tasks.copy_row(rng, train_text, T + 1)
        w = [1.0] * T
    else:
        kind = rng.choice(tasks.TASKS)
        s = tasks.make(kind, rng, train_text, T + 1)
        b, k = s.bytes(), len(s.answer) + 1
        w = [1.0] * (T - k) + [args.answer_weight] * k
    state["rows"][kind] = state["rows"].get(kind, 0) + 1
    return list(b), w


def lr_at(step):
    warm = min(1.0, (step + 1) / args.warmup)
    left = args.total_steps - step
    return args.lr * warm * max(0.0, min(1.0, left / args.decay_steps))


def evaluate_now(T):
    model.eval()
    erng = random.Random(12345)  # the same held-out samples every time
    rec = {"step": state["step"], "minutes": round(state["minutes"], 1), "length": T,
           "eval_bits_per_byte": round(evaluate.bits_per_byte(model, eval_text, 1024, 4), 4)}
    c1, c2 = evaluate.copy_test(model, eval_text, erng, 4)
    rec["copy_first_bpb"], rec["copy_second_bpb"] = round(c1, 3), round(c2, 3)
    i1, i2 = evaluate.induction_probe(model, random.Random(777), T, 8)
    rec["probe_first_bpb"], rec["probe_second_bpb"] = round(i1, 3), round(i2, 3)
    rec["tasks"] = evaluate.task_accuracy(model, eval_text, erng, T, 4) if T >= 256 else {}  # tasks do not fit shorter rows
    model.train()
    return rec


def checkpoint(T, rec):
    cfg["seq_len"] = state["longest"]
    tmp = ckpt_path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "state": state, "cfg": cfg, "args": vars(args)}, tmp)
    os.replace(tmp, ckpt_path)
    export(model, os.path.join(args.out, "model.bin"), state["longest"])
    record = {**cfg, "steps": state["step"], "minutes": round(state["minutes"], 1), "tokens": state["tokens"],
              "rows_by_kind": state["rows"], "mix_history": state["mix_history"], "phases": args.phases, "lr": args.lr,
              "warmup": args.warmup, "warm_steps": args.warm_steps,
              "total_steps": args.total_steps, "decay_steps": args.decay_steps,
              "answer_weight": args.answer_weight, "latest_eval": rec}
    with open(os.path.join(args.out, "config.json.tmp"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(args.out, "config.json.tmp"), os.path.join(args.out, "config.json"))
    with open(os.path.join(args.out, "evals.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    print("checkpoint", json.dumps(rec), flush=True)


stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # checkpoint, then exit
t_run = time.time()
t_last = time.time()
interval = args.first_ckpt_minutes if args.first_ckpt_minutes is not None else args.ckpt_minutes
model.train()
while state["step"] < args.total_steps:
    T, B = phase(state["step"])
    state["longest"] = max(state["longest"], T)
    lr = lr_at(state["step"])
    for g in opt.param_groups:
        g["lr"] = lr
    t0 = time.time()
    note_mix(state["step"])
    rows = [row(T, mix_at(state["step"])) for _ in range(B)]
    x = torch.tensor([r[0] for r in rows], dtype=torch.long)
    wt = torch.tensor([r[1] for r in rows])
    nll = F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1), reduction="none").view(B, T)
    loss = (nll * wt).sum() / wt.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    dt = time.time() - t0
    state["step"] += 1
    state["minutes"] += dt / 60
    state["tokens"] += B * T
    if state["step"] % 25 == 0:
        ans = wt > 1
        ans_bpb = (nll[ans].mean().item() / math.log(2)) if ans.any() else float("nan")
        txt_bpb = nll[~ans].mean().item() / math.log(2)
        print(f"step {state['step']} T {T} lr {lr:.2e} loss {loss.item():.4f} text_bpb {txt_bpb:.3f} "
              f"answer_bpb {ans_bpb:.3f} {B * T / dt:.0f} tok/s", flush=True)
    done = state["step"] >= args.total_steps or stop or (time.time() - t_run) / 60 > args.max_minutes
    if (time.time() - t_last) / 60 > interval or done:
        checkpoint(T, evaluate_now(T))
        t_last, interval = time.time(), args.ckpt_minutes
    if done:
        break
print("stopped at step", state["step"], flush=True)
