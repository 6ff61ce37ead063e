"""The world: a procedural image world where quality is measurable on a CPU (README, "The world").

- render.py: images of one object, by shape, colour, background and style; captions; the known and novel parts.
- pretrain.py: the world base (VAE, text encoder, UNet) pretrained on its known parts (`make world-base`).
- judge.py: the oracle judge, trained on rendered ground truth (`make judge`); the `world` scorer.
- assets/: the committed world base (base/, a diffusers directory) and judge weights.
"""
