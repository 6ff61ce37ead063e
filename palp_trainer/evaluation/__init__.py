"""Evaluation: milestone sampling and scores (milestone), the scorer interface (scorers) and CLIP (clip)."""
