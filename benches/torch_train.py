"""PyTorch's side of `swarmrun bench train`: the same model trained the
same way on CPU, for a same-run ratio.

nanoGPT's GPT as swarmrun builds it: pre-LayerNorm blocks with no biases
(LayerNorm gains only), untied token embedding and LM head, GELU MLP of 4x
width, causal self-attention, no dropout. A step is `microbatches`
microbatches of `microbatch` sequences of `block` tokens, gradients
accumulated, then one AdamW step (betas 0.9/0.99, eps 1e-8, weight decay
0.1 on matrices), as swarmrun's one-process row does. Tokens are random:
speed does not depend on the text. Prints one line, `tokens_per_s X`.
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        heads = lambda z: z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class Gpt(nn.Module):
    def __init__(self, vocab, n_layer, n_head, n_embd, block):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def main():
    p = argparse.ArgumentParser()
    for name in ["vocab", "n-layer", "n-head", "n-embd", "block", "microbatch", "microbatches", "steps", "threads"]:
        p.add_argument("--" + name, type=int, required=True)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(3)
    model = Gpt(a.vocab, a.n_layer, a.n_head, a.n_embd, a.block)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    other = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), eps=1e-8,
    )
    batches = [
        (torch.randint(a.vocab, (a.microbatch, a.block)), torch.randint(a.vocab, (a.microbatch, a.block)))
        for _ in range(a.microbatches)
    ]

    def step():
        opt.zero_grad(set_to_none=True)
        for idx, targets in batches:
            (model(idx, targets) / a.microbatches).backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    elapsed = time.perf_counter() - start
    tokens = a.steps * a.microbatches * a.microbatch * a.block
    print(f"tokens_per_s {tokens / elapsed}")
    assert math.isfinite(tokens / elapsed)


if __name__ == "__main__":
    main()
