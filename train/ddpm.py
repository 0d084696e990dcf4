"""Train a DDPM (AnoDDPM / AutoDDPM scorers) on normal patches.

Usage: ``python train/ddpm.py --config configs/ddpm/demo.yaml [key=value ...] [--resume latest]``
(or ``accelerate launch train/ddpm.py ...`` for multi-GPU).
"""

from gen_ad.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main("ddpm"))
