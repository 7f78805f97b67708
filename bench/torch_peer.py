"""PyTorch CPU peer of `bench scale`: the same Llama shapes, random fp32 weights, prefill and LoRA training.

/usr/bin/python3 bench/torch_peer.py [180M|1.1B]
Needs Debian's python3-torch with libopenblas0-pthread (Debian's default BLAS is far slower); threads = cores.
A plain Llama written here (no transformers on Debian): embedding, RMSNorm, RoPE, grouped-query attention with a
causal mask, SwiGLU, tied or untied head; LoRA r = 8 (alpha 16) on every linear layer, the base frozen, AdamW.
"""
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "180M": dict(hidden=576, inter=1536, heads=9, kv=3, layers=30, vocab=128256, theta=100000.0, tied=True),
    "1.1B": dict(hidden=2048, inter=5632, heads=32, kv=4, layers=22, vocab=32000, theta=10000.0, tied=False),
}


class Lora(torch.nn.Module):
    def __init__(self, out_f, in_f, r=8, alpha=16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_f, in_f) * 0.02, requires_grad=False)
        self.a = torch.nn.Parameter(torch.randn(r, in_f) / math.sqrt(in_f))
        self.b = torch.nn.Parameter(torch.zeros(out_f, r))
        self.scale = alpha / r
        self.lora = False

    def forward(self, x):
        y = F.linear(x, self.weight)
        return y + F.linear(F.linear(x, self.a), self.b) * self.scale if self.lora else y


class Layer(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        h, d = s["hidden"], s["hidden"] // s["heads"]
        self.s, self.d = s, d
        self.q, self.k, self.v = Lora(s["heads"] * d, h), Lora(s["kv"] * d, h), Lora(s["kv"] * d, h)
        self.o = Lora(h, s["heads"] * d)
        self.gate, self.up, self.down = Lora(s["inter"], h), Lora(s["inter"], h), Lora(h, s["inter"])
        self.n1, self.n2 = torch.nn.Parameter(torch.ones(h), requires_grad=False), torch.nn.Parameter(torch.ones(h), requires_grad=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        h = rms(x, self.n1)
        q = self.q(h).view(b, t, self.s["heads"], self.d).transpose(1, 2)
        k = self.k(h).view(b, t, self.s["kv"], self.d).transpose(1, 2)
        v = self.v(h).view(b, t, self.s["kv"], self.d).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = self.s["heads"] // self.s["kv"]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.d) + mask
        x = x + self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
        h = rms(x, self.n2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rot * sin


class Llama(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s
        self.embed = torch.nn.Parameter(torch.randn(s["vocab"], s["hidden"]) * 0.02, requires_grad=False)
        self.layers = torch.nn.ModuleList(Layer(s) for _ in range(s["layers"]))
        self.norm = torch.nn.Parameter(torch.ones(s["hidden"]), requires_grad=False)
        self.head = self.embed if s["tied"] else torch.nn.Parameter(torch.randn(s["vocab"], s["hidden"]) * 0.02, requires_grad=False)

    def forward(self, ids):
        t = ids.shape[1]
        d = self.s["hidden"] // self.s["heads"]
        inv = 1.0 / (self.s["theta"] ** (torch.arange(0, d, 2).float() / d))
        ang = torch.outer(torch.arange(t).float(), inv)
        cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
        mask = torch.full((t, t), float("-inf")).triu(1)
        x = self.embed[ids]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return F.linear(rms(x, self.norm), self.head)


def median(f, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    size = sys.argv[1] if len(sys.argv) > 1 else "180M"
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(1)
    s = SHAPES[size]
    model = Llama(s)
    # The base's parameters (a tied head is the embedding, counted once), not the LoRA factors a and b.
    params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith((".a", ".b")))
    blas = os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3")
    print(f"// torch {torch.__version__}, {torch.get_num_threads()} threads, libblas.so.3 -> {blas}; {size}: {params:,} parameters")
    ids = torch.randint(0, s["vocab"], (1, 128))
    with torch.no_grad():
        model(ids)
        t = median(lambda: model(ids), 5)
    print(f"torch {size} prefill T=128: {128 / t:.1f} tokens/s")
    for m in model.modules():
        if isinstance(m, Lora):
            m.lora = True
    batch = 4 if size == "180M" else 1
    ids = torch.randint(0, s["vocab"], (batch, 160))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad()
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, s["vocab"]), ids[:, 1:].reshape(-1)).backward()
        opt.step()

    step()
    t = median(step, 3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"torch {size} LoRA r=8 all-linear, batch {batch} x 160: {batch * 160 / t:.1f} positions/s, {t:.2f} s a step; peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
