"""What a model family gives the shared training loop.

A family (``wgan``, ``stylegan2``, ``ddpm``) builds its networks and optimisers from its config,
runs one optimisation step on a batch, and knows how to sample. The loop
(:mod:`gen_ad.training.loop`) owns everything else: devices, DDP, mixed precision, EMA,
counters, logging, sample grids, FID, checkpoints and export.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from accelerate import Accelerator
from torch import nn

from gen_ad.config import from_dict
from gen_ad.errors import ConfigError
from gen_ad.scoring.base import AnomalyScorer

Logs = dict[str, torch.Tensor]
#: What a phase's loss function returns for one micro-batch: the loss to back-propagate and named
#: scalar tensors to log (averaged over the micro-batches, kept on the device).
LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, Logs]]


@dataclass
class StepContext:
    """Everything a family's ``train_step`` may use for one optimisation step.

    Attributes:
        accelerator: the run's Accelerator (use ``ctx.backward`` rather than ``loss.backward``).
        models: prepared (possibly DDP-wrapped) models by name.
        optimizers: prepared optimisers by name.
        schedulers: LR schedulers by name (stepped by the family where it steps the optimiser).
        ema: EMA copies by name (updated by the loop after the step; read-only here).
        step: 0-based index of the step being run.
        kimg: thousands of training images seen before this step.
        generator: torch.Generator on the device, seeded from (seed, step, rank): every random draw
            of the step must come from it, which makes resume exact.
        grad_accum: micro-batches per step (see :meth:`micro_batches`).
        logs: what the step logs, as device tensors (filled by :meth:`phase` and :meth:`log`);
            the loop reads them on the host once per step (finiteness) and at logging time.
        host_rng: a Python RNG seeded from the step's seed, for draws the host needs as
            numbers (e.g. a style-mixing cut-off): no tensor, no device sync.
    """

    accelerator: Accelerator
    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    ema: dict[str, nn.Module]
    step: int
    kimg: float
    generator: torch.Generator
    grad_accum: int = 1
    logs: Logs = field(default_factory=dict)
    host_rng: random.Random = field(default_factory=random.Random)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through Accelerate (handles fp16 loss scaling)."""
        self.accelerator.backward(loss)

    def autocast(self) -> Any:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        return self.accelerator.autocast()

    def micro_batches(self, batch: torch.Tensor, model: nn.Module | None = None,
                      ) -> Iterator[torch.Tensor]:
        """Split the per-process batch into ``grad_accum`` chunks.

        Gradient sync of ``model`` (DDP) is skipped on all but the last chunk. Divide each chunk's
        loss by ``grad_accum`` before ``backward`` so gradients average over the whole batch.
        """
        chunks = torch.chunk(batch, self.grad_accum)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            sync = nullcontext() if (last or model is None) else self.accelerator.no_sync(model)
            with sync:
                yield chunk

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a scalar to log (a tensor stays on its device: no host sync here)."""
        v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(value)
        self.logs[name] = v

    def phase(self, optimizer: str, model: nn.Module, batch: torch.Tensor, loss_fn: LossFn, *,
              clip_grad: float = 0.0, also_zero: Sequence[str] = (),
              step_scheduler: bool = False, nan_to_num: bool = False) -> None:
        """One optimisation phase: ``grad_accum`` micro-batches, then one optimiser step.

        Zeroes the gradients of ``optimizer``; for each chunk of ``batch`` (DDP gradient sync of
        ``model`` only on the last one) runs ``loss_fn(chunk)`` under autocast and back-propagates
        ``loss / grad_accum``; optionally clips the gradient norm of ``model`` (logged as
        ``grad_norm``); steps and zeroes the optimiser (and the gradients of ``also_zero``, e.g. a
        critic that received gradients through the generator's loss) and, with
        ``step_scheduler``, its LR schedule. The logged values are averaged over the
        micro-batches on the device; nothing is read back to the host. With ``nan_to_num``
        the gradients are sanitised before clipping and the step (NaN -> 0, +-inf -> +-1e5), as
        stylegan2-ada-pytorch does for its float16 layers trained without loss scaling: one
        overflow would otherwise turn a weight into NaN for good (Adam with beta1 = 0 gives
        inf / inf).

        Args:
            optimizer: name of the optimiser (and schedule) to step.
            model: the (possibly DDP-wrapped) model whose gradients this phase computes.
            batch: ``[b, ...]`` tensor split along dim 0 (images, or latents).
            loss_fn: ``chunk -> (loss, {name: scalar tensor})``.
        """
        opt = self.optimizers[optimizer]
        opt.zero_grad(set_to_none=True)
        sums: Logs = {}
        for chunk in self.micro_batches(batch, model):
            with self.autocast():
                loss, logs = loss_fn(chunk)
            self.backward(loss / self.grad_accum)
            for k, v in logs.items():
                v = v.detach().float() / self.grad_accum
                sums[k] = sums[k] + v if k in sums else v
        if nan_to_num:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(nan=0.0, posinf=1e5, neginf=-1e5)
        if clip_grad > 0:
            sums["grad_norm"] = torch.as_tensor(
                self.accelerator.clip_grad_norm_(model.parameters(), clip_grad)).detach().float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name in also_zero:
            self.optimizers[name].zero_grad(set_to_none=True)
        if step_scheduler and optimizer in self.schedulers:
            self.schedulers[optimizer].step()
        self.logs.update(sums)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal noise from the step's generator, on the device."""
        return torch.randn(*shape, generator=self.generator, device=self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0,1) noise from the step's generator, on the device."""
        return torch.rand(*shape, generator=self.generator, device=self.device)


class Family(ABC):
    """A model family as the training loop sees it.

    Subclasses set ``name``, ``config_cls`` and (when they offer scorer options)
    ``scorer_options_cls``, implement the abstract methods, and are made known with
    :func:`register_family` next to their definition. They hold the config (``self.cfg``) and any
    adaptive state (ADA's p, path-length mean) that must survive a resume: return it from
    :meth:`state_dict` (tensors and plain numbers only).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[Any]] = object
    scorer_options_cls: ClassVar[type | None] = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def build_models(self) -> dict[str, nn.Module]:
        """Create all networks from ``self.cfg`` alone (trainable and frozen ones)."""

    @abstractmethod
    def build_optimizers(self, models: Mapping[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """Optimisers by name for the (unwrapped) models."""

    def build_schedulers(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
        """LR schedulers by name (default: none)."""
        return {}

    def ema_models(self) -> list[str]:
        """Names of models that get an EMA copy (exported as ``<name>_ema``)."""
        return []

    def ema_decay(self, step: int, kimg: float) -> float:
        """EMA decay used after ``step`` (default: ``train.ema_decay`` with optional warm-up)."""
        beta = float(self.cfg.train.ema_decay)
        if self.cfg.train.ema_warmup:
            beta = min(beta, (1.0 + step) / (10.0 + step))
        return beta

    def setup(self, models: Mapping[str, nn.Module], device: torch.device, *,  # noqa: B027
              resuming: bool = False) -> None:
        """Called once the models are on ``device`` (e.g. to load a previous stage's weights).

        Args:
            models: the models of :meth:`build_models`.
            device: where they run.
            resuming: a checkpoint restores every model next (skip loading earlier stages).
        """

    @abstractmethod
    def train_step(self, ctx: StepContext, batch: torch.Tensor) -> Logs:
        """Run one optimisation step: a list of phases (:meth:`StepContext.phase`).

        Args:
            ctx: the step context.
            batch: this process's images ``[b,3,H,W]`` in ``[-1,1]`` on ``ctx.device``.
        Returns:
            Scalar logs (losses etc.) by name, as tensors (usually ``ctx.logs``) or numbers;
            every value must be finite. Do not read tensors back to the host here.
        """

    @abstractmethod
    def sample(self, models: Mapping[str, nn.Module], n: int,
               generator: torch.Generator) -> torch.Tensor:
        """Generate ``n`` images ``[n,3,H,W]`` in ``[-1,1]`` (models: EMA versions where present,
        under their plain names, in eval mode; called under ``torch.no_grad``)."""

    def deterministic_conflicts(self) -> list[str]:
        """What this config runs on CUDA that has no deterministic kernel, each as a sentence
        naming the config keys and what to change; a CUDA run in deterministic mode refuses
        to start when there is any (:func:`gen_ad.training.loop.check_deterministic_conflicts`).
        Default: none."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Adaptive state to checkpoint (tensors and plain numbers)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027
        """Restore what :meth:`state_dict` returned."""

    def scorer_options(self, kwargs: Mapping[str, Any]) -> Any:
        """``kwargs`` as the family's typed, validated scorer options (``scorer_options_cls``).

        Raises:
            ConfigError: an unknown key (with the closest valid one), a wrong type or an
                impossible value, named as ``scorer.<key>``.
        """
        if self.scorer_options_cls is None:
            if kwargs:
                raise ConfigError(f"the {self.name} family takes no scorer options, got "
                                  f"{sorted(kwargs)}")
            return None
        return from_dict(self.scorer_options_cls, dict(kwargs), prefix="scorer")

    def scorers(self, models: Mapping[str, nn.Module], **kwargs: Any) -> dict[str, AnomalyScorer]:
        """Anomaly scorers this family offers for a trained run (name -> scorer); ``kwargs`` are
        checked by :meth:`scorer_options`."""
        self.scorer_options(kwargs)
        return {}


FamilyT = TypeVar("FamilyT", bound=type[Family])


def register_family(cls: FamilyT) -> FamilyT:
    """Class decorator: ``cls`` is a model family, found by its ``name`` through
    :func:`gen_ad.training.registry.family_class` (``gen-ad train <name>``, :func:`load_run`)."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a family name before registering")
    cls._registered = True  # type: ignore[attr-defined]  # in cls.__dict__: not inherited
    return cls
