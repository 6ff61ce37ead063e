"""Sampling: a stock diffusers pipeline around the live modules (pipeline) and the inference methods
(guidance: CFG, personalization guidance, AlignIT)."""
