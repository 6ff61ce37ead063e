"""The scorer interface: how a milestone's images become scores. Two implementations, chosen in one place
(`scorer_kind`): CLIP (CLIP-T / CLIP-I, DINO; meaningful with real weights) and the world's oracle judge
(judge_text / judge_subject; palp_trainer/world/judge.py).

Light to import (recipe validation reads the names): each kind imports its model only in `load`.
"""

from .. import config


class ClipScores:
    """CLIP-T against the clean prompt y^c (and per element), CLIP-I (and DINO) against each subject's photos."""

    name = "clip"
    metric_names = ("clip_t", "clip_i")  # (text alignment, subject fidelity)
    needs_references = False  # CLIP-T alone scores a prompt without the subjects' photos

    def score_names(self, ev) -> tuple[str, ...]:
        return ("clip_t", "clip_i", *(("dino",) if ev.dino_model else ()), *(f"clip_t/{e}" for e in ev.elements),
                "composite")

    def load(self, clip_model: str, dino_model: str | None, device: str):
        import torch

        from .clip import Scorer
        return Scorer(clip_model=clip_model, dino_model=dino_model, device=torch.device(device))

    def score(self, model, ev, config, images, references) -> dict:
        return model.score(images, config.clean_prompt, references, ev.elements, ev.weight_text, ev.weight_image)


class WorldScores:
    """The world judge reads the target prompt's attributes and each subject's look off its references."""

    name = "world"
    metric_names = ("judge_text", "judge_subject")
    needs_references = True

    def score_names(self, ev) -> tuple[str, ...]:
        return ("judge_text", "judge_subject", "judge_success", "composite")

    def load(self, clip_model: str, dino_model: str | None, device: str):
        from ..world.judge import WorldJudge
        return WorldJudge()

    def score(self, model, ev, config, images, references) -> dict:
        return model.score(images, config.target_prompt, [(s.token, s.class_word) for s in config.subjects],
                           references, ev.weight_text, ev.weight_image)


SCORERS = {kind.name: kind for kind in (ClipScores(), WorldScores())}
assert tuple(SCORERS) == config.SCORERS, "config.SCORERS names what eval.scorer may be: one kind per name"


def scorer_kind(name: str | None):
    """The scorer named by eval.scorer (None, before a recipe resolves it: CLIP)."""
    return SCORERS[name or "clip"]


def metric_names(ev) -> tuple[str, str]:
    """(text alignment, subject fidelity) of eval config `ev`: the axes of selection, the Pareto plot, the composite."""
    return scorer_kind(ev.scorer).metric_names


def score_names(ev) -> tuple[str, ...]:
    """Every score a milestone evaluation reports under `ev`: what scheduler.metric and champion_metric may name."""
    return scorer_kind(ev.scorer).score_names(ev)
