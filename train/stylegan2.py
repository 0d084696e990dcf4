"""Train StyleGAN2 (+ ADA) or its projection encoder: ``python train/stylegan2.py --config Y``."""

from gen_ad.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main("stylegan2"))
