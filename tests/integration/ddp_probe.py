"""Train the toy family under ``accelerate launch`` with test hooks, recording what each rank did.

``python ddp_probe.py OUT [--resume X] [--signal-at S0,S1] [--slow-repair S] [--slow-build S]
[key=value ...]``

Hooks: ``--signal-at`` flags a stop signal on rank ``r`` right after its step ``S_r`` (as a
SIGTERM reaching the processes a step apart would); ``--slow-repair`` makes rank 0 wait before
it repairs interrupted swaps under its writer lock; ``--slow-build`` makes building a patch cache
take that much longer (as a large folder would). Each rank writes ``OUT/probe-<rank>.json``
(the state it loaded, how many patch caches it built, its final step) and
``OUT/replica-<rank>.pt`` (its final weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume")
    p.add_argument("--signal-at", default="")
    p.add_argument("--slow-repair", type=float, default=0.0)
    p.add_argument("--slow-build", type=float, default=0.0)
    return p.parse_known_args(argv)


def _hook(args: argparse.Namespace, record: dict[str, Any]) -> None:
    import gen_ad.data.cache as cache
    import gen_ad.training.loop as loop
    from gen_ad.training import checkpoint as ckpt

    rank = int(os.environ.get("RANK", "0"))
    steps = [int(s) for s in args.signal_at.split(",") if s]
    step_fn, load_fn, build_fn, repair_fn = (loop.train_one_step, loop.load_checkpoint,
                                             cache.build_cache, ckpt.recover_states)

    def step(state: Any, batch: torch.Tensor) -> Any:
        logs = step_fn(state, batch)
        if steps and state.counters.step == steps[rank]:
            state.stop_signal.append(15)
        return logs

    def load(state: Any, path: Path) -> None:
        record["loaded"] = str(path)
        load_fn(state, path)

    def build(*a: Any, **k: Any) -> Any:
        record["builds"] += 1
        time.sleep(args.slow_build)
        return build_fn(*a, **k)

    def repair(run_dir: Any) -> None:
        time.sleep(args.slow_repair)
        repair_fn(run_dir)

    loop.train_one_step, loop.load_checkpoint, cache.build_cache = step, load, build
    ckpt.recover_states = repair  # type: ignore[assignment]


def main(argv: list[str]) -> None:
    from accelerate import PartialState
    from toy_family import ToyConfig, ToyFamily

    from gen_ad.config import load_config
    from gen_ad.training.loop import run_training

    args, overrides = _parse(argv)
    record: dict[str, Any] = {"loaded": None, "builds": 0}
    _hook(args, record)
    cfg = load_config(ToyConfig, None, [f"out={args.out}", *overrides])
    fam = ToyFamily(cfg)
    run_training(fam, resume=args.resume)
    rank = PartialState().process_index
    weights = {f"{m}.{k}": v.clone() for m in ("net", "critic")
               for k, v in fam.trained[m].state_dict().items()}
    torch.save(weights, f"{args.out}/replica-{rank}.pt")
    (Path(args.out) / f"probe-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
