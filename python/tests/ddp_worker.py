"""Worker for test_ddp_torch.py: trains a small chain of lorafuse.torch layers (LoraLinear ->
DoraLinear -> VeraLinear -> AdaLoraLinear, tanh between) for a few AdamW steps, either as one
rank of a 2-process data-parallel run on the CPU (gloo) or, imported, in one process.

    python -m torch.distributed.run --nproc_per_node=2 --standalone ddp_worker.py \
        --launcher torchrun --out DIR [--desync-rank1]
    ACCELERATE_USE_CPU=true python -m accelerate.commands.launch --multi_gpu --num_processes 2 \
        ... ddp_worker.py --launcher accelerate --out DIR

Each rank trains on its half of the fixed batch (loss = mean over its rows, so DDP's gradient
average equals the whole batch's gradient) and writes ``<launcher>_rank<r>.pt`` into DIR: the
final trainable parameters, the losses, and ``stale``, each layer's max abs difference between
its forward and a plain-torch composition of its current parameters (after the steps).

Not a test file (no ``test_`` prefix): pytest imports it for the single-process reference.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import lorafuse.torch as lt

IN, HID, R = 32, 48, 4
BATCH, SEQ = 8, 3  # x [BATCH, SEQ, IN]; each of 2 ranks takes BATCH // 2 samples
STEPS, LR = 5, 1e-2
SEED = 1234


class Chain(nn.Module):
    """``adalora(tanh(vera(tanh(dora(tanh(lora(x)))))))``: 32 -> 48 -> 48 -> 48 -> 32."""

    def __init__(self, seed: int = SEED) -> None:
        super().__init__()
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed + 1)

        def rnd(*shape: int, scale: float = 0.3) -> nn.Parameter:
            return nn.Parameter(scale * torch.randn(*shape, generator=g))

        self.lora = lt.LoraLinear(nn.Linear(IN, HID), rnd(R, IN), rnd(HID, R), scaling=2.0)
        self.dora = lt.DoraLinear(
            nn.Linear(HID, HID), rnd(R, HID), rnd(HID, R), scaling=1.5,
            magnitude=nn.Parameter(torch.rand(HID, generator=g) + 0.5),
        )
        # VeRA's shared projections are wider than the layer (the kernel slices them).
        self.vera = lt.VeraLinear(
            nn.Linear(HID, HID), torch.randn(R, HID + 8, generator=g) * 0.3,
            torch.randn(HID + 5, R, generator=g) * 0.3, rnd(R, scale=1.0), rnd(HID, scale=1.0),
        )
        self.adalora = lt.AdaLoraLinear(
            nn.Linear(HID, IN), rnd(R, HID), rnd(IN, R), rnd(R, 1, scale=1.0), scaling=3.0,
            ranknum=float(R),
        )

    def layers(self) -> List[nn.Module]:
        return [self.lora, self.dora, self.vera, self.adalora]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers()):
            if i:
                x = torch.tanh(x)
            x = layer(x)
        return x


def batch() -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 2)
    return torch.randn(BATCH, SEQ, IN, generator=g), torch.randn(BATCH, SEQ, IN, generator=g)


def trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    """name -> detached copy of every parameter that requires grad (DDP's ``module.`` stripped)."""
    return {
        n.removeprefix("module."): p.detach().clone()
        for n, p in model.named_parameters() if p.requires_grad
    }


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          backward=None) -> List[float]:
    """STEPS AdamW steps of ``mse(model(x), y)`` (a mean over the rows given)."""
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        (backward or torch.Tensor.backward)(loss)
        opt.step()
        losses.append(loss.item())
    return losses


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output composed in plain torch from its CURRENT parameters (PEFT's formulas,
    as test_torch.py's references)."""
    w0, b = layer.base_layer.weight, layer.base_layer.bias
    base = x @ w0.t() + b
    if isinstance(layer, lt.DoraLinear):
        a, bb, s, m = layer.A, layer.B, layer.scaling, layer.magnitude
        n = torch.linalg.norm(w0 + s * bb @ a, dim=1)
        return (m / n) * (x @ w0.t() + s * (x @ a.t()) @ bb.t()) + b
    if isinstance(layer, lt.LoraLinear):
        return base + layer.scaling * (x @ layer.A.t()) @ layer.B.t()
    if isinstance(layer, lt.VeraLinear):
        va, vb, ld, lb = layer._tensors()
        return base + lb * ((ld * (x @ va[:, : layer.in_features].t())) @ vb[: layer.out_features, :].t())
    if isinstance(layer, lt.AdaLoraLinear):
        a, bb, e, rn = layer._tensors()
        return base + (x @ (a * e).t()) @ bb.t() * layer.scaling / (rn + 1e-5)
    raise TypeError(type(layer).__name__)


def stale(model: Chain, x: torch.Tensor) -> Dict[str, float]:
    """Per layer: max |forward - reference| on that layer's own input (after the steps)."""
    out = {}
    with torch.no_grad():
        h = x
        for i, (name, layer) in enumerate(zip(["lora", "dora", "vera", "adalora"], model.layers())):
            if i:
                h = torch.tanh(h)
            y = layer(h)
            out[name] = float((y - reference(layer, h)).abs().max())
            h = y
    return out


def desync(model: Chain, rank: int) -> None:
    """Rank-specific values (base weights included) and a forward that fills the kernels' cache
    of the frozen base weights with them: DDP's initial broadcast of rank 0's state must replace
    them, in the kernels' cache too, or this rank trains a different model."""
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.add_(0.5 * torch.randn(t.shape, generator=g))
        model(batch()[0])


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launcher", choices=["torchrun", "accelerate"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--desync-rank1", action="store_true")
    args = ap.parse_args(argv)
    x, y = batch()

    if args.launcher == "torchrun":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        model = Chain()
        if args.desync_rank1 and rank == 1:
            desync(model, rank)
        ddp = DDP(model)
        opt = optimizer(ddp)
        backward = None
        info = {"backend": dist.get_backend()}
    else:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        acc = Accelerator()
        rank, world = acc.process_index, acc.num_processes
        model = Chain()
        ddp, opt = acc.prepare(model, optimizer(model))
        backward = acc.backward
        info = {
            "backend": acc.state.backend, "distributed_type": str(acc.distributed_type),
            "wrapped": type(ddp).__name__,
        }
        assert acc.distributed_type == DistributedType.MULTI_CPU, info
        assert acc.unwrap_model(ddp) is model
    assert world == 2 and BATCH % world == 0, world
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    losses = train(ddp, opt, x[half], y[half], backward)
    result = {
        "rank": rank, "world": world, "losses": losses, "params": trainable(model),
        "stale": stale(model, x), "info": info,
    }
    out = pathlib.Path(args.out)
    torch.save(result, out / f"{args.launcher}_rank{rank}.pt")
    print(f"rank {rank}/{world} {info}: losses {[round(v, 6) for v in losses]} stale {result['stale']}",
          flush=True)
    if args.launcher == "torchrun":
        dist.destroy_process_group()
    else:
        acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
