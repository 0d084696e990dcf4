"""Train f-AnoGAN (WGAN-GP, then the izi_f encoder with ``stage=encoder gan_run=<run>``).

Usage: ``python train/wgan.py --config configs/wgan/demo.yaml [key=value ...] [--resume latest]``
(or ``accelerate launch train/wgan.py ...`` for multi-GPU).
"""

from gen_ad.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main("wgan"))
