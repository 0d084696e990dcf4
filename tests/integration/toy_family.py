"""A tiny two-network family for testing the shared loop (also a script for DDP tests).

``python toy_family.py OUT [key=value ...]`` trains it; under ``accelerate launch`` each process
writes ``OUT/replica-<rank>.pt`` with its final weights so tests can compare replicas.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gen_ad.config import DataConfig, TrainConfig, load_config
from gen_ad.training.family import Family, Logs, StepContext, register_family


@dataclass
class ToyConfig:
    out: str = "checkpoints/toy"
    data: DataConfig = field(default_factory=lambda: DataConfig(train="synthetic", size=16,
                                                                synthetic=24))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=4, max_steps=6))
    width: int = 4
    nan_at_step: int = -1

    def validate(self, prefix: str) -> None:
        pass


class ToyNet(nn.Module):
    def __init__(self, *, width: int) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, width, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.dec = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dec(self.drop(torch.relu(self.enc(x)))))


@register_family
class ToyFamily(Family):
    name = "toy"
    config_cls = ToyConfig

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__(cfg)
        self.running = torch.zeros(())

    def build_models(self) -> dict[str, nn.Module]:
        return {"net": ToyNet(width=self.cfg.width), "critic": nn.Linear(3, 1)}

    def setup(self, models: Mapping[str, nn.Module], device: torch.device, *,
              resuming: bool = False) -> None:
        self.trained = models  # the very objects the loop trains (DDP shares their parameters)
        self.setup_resuming = resuming

    def build_optimizers(self, models: Mapping[str, nn.Module]) -> dict[str, Any]:
        return {"net": torch.optim.Adam(models["net"].parameters(), lr=1e-2),
                "critic": torch.optim.Adam(models["critic"].parameters(), lr=1e-2)}

    def build_schedulers(self, optimizers: Mapping[str, Any]) -> dict[str, Any]:
        return {"net": torch.optim.lr_scheduler.LambdaLR(optimizers["net"],
                                                          lambda s: min(1.0, (s + 1) / 3))}

    def ema_models(self) -> list[str]:
        return ["net"]

    def train_step(self, ctx: StepContext, batch: torch.Tensor) -> Logs:
        net, critic = ctx.models["net"], ctx.models["critic"]
        feats = batch.mean(dim=(2, 3)) + 0.1 * ctx.randn(batch.shape[0], 3)

        def critic_loss(f: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            loss = critic(f).pow(2).mean()
            return loss, {"loss_critic": loss}

        def net_loss(chunk: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            noisy = chunk + 0.1 * ctx.randn(*chunk.shape)
            loss = (net(noisy) - chunk).pow(2).mean()
            return loss, {"loss_net": loss}

        ctx.phase("critic", critic, feats, critic_loss)
        ctx.phase("net", net, batch, net_loss, step_scheduler=True)
        total = ctx.logs["loss_net"]
        self.running = 0.9 * self.running.to(total.device) + 0.1 * total
        if ctx.step == self.cfg.nan_at_step:
            ctx.log("loss_net", total * float("nan"))
        return ctx.logs

    def sample(self, models: Mapping[str, nn.Module], n: int,
               generator: torch.Generator) -> torch.Tensor:
        s = self.cfg.data.size
        z = torch.rand(n, 3, s, s, generator=generator, device=generator.device) * 2 - 1
        return models["net"](z)

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.running = state["running"].clone()


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    from gen_ad.training.loop import run_training

    out, overrides = argv[0], argv[1:]
    cfg = load_config(ToyConfig, None, [f"out={out}", *overrides])
    fam = ToyFamily(cfg)
    run_training(fam)
    rank = PartialState().process_index
    weights = {f"{m}.{k}": v.clone() for m in ("net", "critic")
               for k, v in fam.trained[m].state_dict().items()}
    torch.save(weights, f"{out}/replica-{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
