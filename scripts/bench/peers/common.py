"""What every peer-library worker shares: the model, the batches, the timeline, the hash.

Plain PyTorch only (each library runs in its own virtual environment, without our
package). The model has exactly the shapes of ``conf/recipe/bench_gpt.yaml``: vocab 4096,
hidden 512, 8 layers, 8 heads / 4 query groups, SwiGLU FFN 1408, RMSNorm, untied output
layer, no biases: 27,795,968 parameters; Adam keeps two fp32 tensors per parameter.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, LAYERS, HEADS, GROUPS, FFN = 4096, 512, 8, 8, 4, 1408
SEQ, MICRO_BATCH = 128, 2  # global batch 8 over 4 data-parallel ranks, as bench_gpt
PARAMETERS = 27_795_968
LR = 3.0e-3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = HIDDEN // HEADS
        self.norm1 = nn.RMSNorm(HIDDEN)
        self.qkv = nn.Linear(HIDDEN, HIDDEN + 2 * GROUPS * self.head_dim, bias=False)
        self.proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.norm2 = nn.RMSNorm(HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, 2 * FFN, bias=False)
        self.fc2 = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [HIDDEN, GROUPS * self.head_dim, GROUPS * self.head_dim], dim=-1)
        q = q.view(b, s, HEADS, self.head_dim).transpose(1, 2)
        k = k.view(b, s, GROUPS, self.head_dim).transpose(1, 2).repeat_interleave(HEADS // GROUPS, 1)
        v = v.view(b, s, GROUPS, self.head_dim).transpose(1, 2).repeat_interleave(HEADS // GROUPS, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, HIDDEN))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model() -> GPT:
    torch.manual_seed(1234)  # every rank starts from the same weights
    model = GPT()
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMETERS, count
    return model


def batch(step: int, data_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic micro-batch of data-parallel rank ``data_rank`` at ``step``."""
    g = torch.Generator().manual_seed(step * 1000 + data_rank)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(model: nn.Module, step: int, data_rank: int) -> torch.Tensor:
    x, y = batch(step, data_rank)
    return F.cross_entropy(model(x).view(-1, VOCAB), y.reshape(-1))


def state_sha256(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Parameters, then Adam's exp_avg and exp_avg_sq, in parameter order."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                h.update(st[key].contiguous().numpy().tobytes())
    return h.hexdigest()


class Timeline:
    """One JSON line per event in ``$PEERS_OUT/<name>.jsonl``; ``t`` is ``time.time()``."""

    def __init__(self, name: str) -> None:
        self.path = os.path.join(os.environ["PEERS_OUT"], f"{name}.jsonl")

    def write(self, event: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")


def start_barrier(world: int, timeout_s: float = 600) -> None:
    """Wait until ``world`` timelines have a ``ready`` line (a file barrier: no ports)."""
    out, deadline = os.environ["PEERS_OUT"], time.time() + timeout_s
    while True:
        ready = 0
        for name in os.listdir(out):
            if name.endswith(".jsonl"):
                with open(os.path.join(out, name)) as f:
                    ready += f.read().count('"event": "ready"')
        if ready >= world:
            return
        if time.time() > deadline:
            raise TimeoutError(f"only {ready} of {world} ranks ready after {timeout_s} s")
        time.sleep(0.02)


def kill_self(timeline: Timeline, step: int) -> None:
    """The injected fault: SIGKILL in the optimizer phase of ``step``, as ours."""
    timeline.write("kill", step=step)
    os.kill(os.getpid(), 9)
