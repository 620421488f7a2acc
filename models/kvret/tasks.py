"""The long-range task formats shared by train_kvret.py, evaluate.py and kvc-ruler.

The formats are specified in README.md ("Task formats"); examples/ruler generates
the same ones in C++. A sample is bytes: context + question + answer + b"\\n".
The context is filler text (whole lines of Python source) with record lines
inserted at line starts; the question starts a line with '?'; the answer is
what greedy decoding must produce, byte for byte, before the newline.
"""
import random

TASKS = ("single", "multikey", "multivalue", "multiquery", "vartrack", "aggregate")
LOWER = "abcdefghijklmnopqrstuvwxyz"


class Sample:
    def __init__(self, task, context, question, answer):
        self.task, self.context, self.question, self.answer = task, context, question, answer

    def bytes(self):
        return self.context + self.question + self.answer + b"\n"


def _letters(rng, n, taken):
    while True:
        s = "".join(rng.choice(LOWER) for _ in range(n))
        if s not in taken:
            taken.add(s)
            return s


def _value(rng):
    return str(rng.randrange(1000000, 10000000))  # 7 digits, no leading zero


def _records(task, rng):
    """Record lines (in context order), question and answer of one sample."""
    keys = set()
    key = lambda: _letters(rng, 6, keys)
    if task == "single":
        k, v = key(), _value(rng)
        return [f"@{k}: {v}"], f"?{k}=", f"{k}: {v}"
    if task == "multikey":
        pairs = [(key(), _value(rng)) for _ in range(8)]
        k, v = rng.choice(pairs)
        return [f"@{a}: {b}" for a, b in pairs], f"?{k}=", f"{k}: {v}"
    if task == "multivalue":
        k = key()
        values = [_value(rng) for _ in range(4)]
        mine = [f"@{k}#{i + 1}: {v}" for i, v in enumerate(values)]
        lines = mine + [f"@{key()}: {_value(rng)}" for _ in range(4)]
        rng.shuffle(lines)
        it = iter(mine)  # the key's own records keep their order #1..#4
        lines = [next(it) if l.startswith(f"@{k}#") else l for l in lines]
        return lines, f"?{k}=", "; ".join(f"{k}#{i + 1}: {v}" for i, v in enumerate(values))
    if task == "multiquery":
        pairs = [(key(), _value(rng)) for _ in range(8)]
        asked = rng.sample(pairs, 4)
        return ([f"@{a}: {b}" for a, b in pairs], "?" + " ".join(a for a, _ in asked) + "=",
                "; ".join(f"{a}: {b}" for a, b in asked))
    if task == "vartrack":
        chains = []
        for _ in range(2):  # the asked chain and a distractor chain, interleaved
            names = [key() for _ in range(4)]
            chains.append([f"@{names[0]}: {_value(rng)}"] +
                          [f"@{names[i]}: {names[i - 1]}" for i in range(1, 4)])
        order = [0] * 4 + [1] * 4
        rng.shuffle(order)
        its = [iter(c) for c in chains]
        lines = [next(its[c]) for c in order]
        asked = chains[0]
        hops = [l[1:] for l in reversed(asked)]  # "name: referent", last assignment first
        return lines, f"?{asked[3][1:7]}=", "; ".join(hops)
    if task == "aggregate":
        words = set()
        target = _letters(rng, 5, words)
        lines = [f"%{target}"] * 6
        for _ in range(8):
            w = _letters(rng, 5, words)
            lines += [f"%{w}"] * rng.choice((1, 2))
        rng.shuffle(lines)
        return lines, "?%=", target
    raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")


def filler(rng, text, n):
    """n bytes of whole lines from text (bytes) starting at a random line start, ending in a newline."""
    if n <= 0:
        return b""
    while True:
        i = rng.randrange(0, len(text) - n - 1)
        j = text.find(b"\n", i)
        if j < 0 or j + 1 + n > len(text):
            continue
        chunk = bytearray(text[j + 1:j + 1 + n])
        chunk[-1] = 10  # end on a line boundary so records and the question start lines
        return bytes(chunk)


def make(task, rng, text, length):
    """A sample of exactly `length` bytes (context + question + answer + newline)."""
    lines, q, a = _records(task, rng)
    recs = [l.encode() + b"\n" for l in lines]
    q, a = q.encode(), a.encode()
    n_fill = length - sum(map(len, recs)) - len(q) - len(a) - 1
    if n_fill < 0:
        raise ValueError(f"{task}: length {length} is too short for its records ({length - n_fill} bytes)")
    fill = filler(rng, text, n_fill)
    starts = [0] + [i + 1 for i, c in enumerate(fill) if c == 10 and i + 1 < len(fill)]
    at = sorted(rng.choice(starts) for _ in recs)  # insertion points, in record order
    out, prev = [], 0
    for p, r in zip(at, recs):
        out += [fill[prev:p], r]
        prev = p
    out.append(fill[prev:])
    return Sample(task, b"".join(out), q, a)


def repeat_row(rng, text, length, span):
    """Filler of `length` bytes in which a span of `span` bytes reappears later (copying)."""
    r = bytearray(filler(rng, text, length))
    a0 = rng.randrange(0, length // 2 - span) if length // 2 > span else 0
    b0 = rng.randrange(a0 + span, length - span + 1)
    r[b0:b0 + span] = r[a0:a0 + span]
    return bytes(r)


def random_repeat_row(rng, text, length):
    """Filler of `length` bytes over which 1 to 3 random strings (8 to 64 letters and digits)
    are written 2 or 3 times each: only copying predicts their later occurrences."""
    r = bytearray(filler(rng, text, length))
    for _ in range(rng.randint(1, 3)):
        n = rng.randint(8, max(8, min(64, length // 8)))
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n)).encode()
        for _ in range(rng.randint(2, 3)):
            at = rng.randrange(0, length - n)
            r[at:at + n] = s
    return bytes(r)


PRINTABLE = bytes(range(32, 127)) + b"\n"


def copy_row(rng, text, length):
    """Dense copying: `length` bytes of segments, each a string s followed by s again,
    directly or after a gap of source lines; s (8 to 512 bytes, at most length/4) is
    random printable bytes (only copying predicts its repeat) or a source span (as in
    evaluate.copy_test). About half of every row is predictable only by copying: the
    signal that forms induction heads within a few hundred steps, which the sparser
    random_repeat_row and repeat_row rows did not do in thousands (README.md)."""
    out = bytearray()
    while len(out) < length:
        n = rng.randint(8, max(8, min(512, length // 4)))
        if rng.random() < 0.5:
            s = bytes(rng.choice(PRINTABLE) for _ in range(n))
        else:
            s = filler(rng, text, n)
        gap = filler(rng, text, rng.randint(1, n)) if rng.random() < 0.5 else b""
        out += s + gap + s
    return bytes(out[:length])
