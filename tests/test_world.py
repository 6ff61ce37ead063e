"""The world (renderer, captions, held-out split), its oracle judge, and the pretrained world base."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from palp_trainer.families.base import WORLD_DIR, load_base
from palp_trainer.world import render as world
from palp_trainer.world.judge import HEADS, WorldJudge, parse_prompt
from palp_trainer.world.pretrain import MAX_LENGTH, build_components, vae_roundtrip

A = world.Attrs


def test_render_is_a_function_of_attributes_and_seed():
    a = A("star", "red", "grass", "sketch")
    assert np.array_equal(world.render(a, 3), world.render(a, 3))
    assert not np.array_equal(world.render(a, 3), world.render(a, 4))  # pose and texture vary with the seed
    assert world.render(a, 3).shape == (32, 32, 3) and world.render(a, 3).dtype == np.uint8


def test_attributes_change_what_is_drawn():
    base = world.render(A("circle", "red", "white", "photo"), 0)
    for other in (A("square", "red", "white", "photo"), A("circle", "blue", "white", "photo"),
                  A("circle", "red", "grass", "photo"), A("circle", "red", "white", "sketch")):
        assert np.abs(world.render(other, 0).astype(int) - base).mean() > 3, other


def test_held_out_and_novel_parts_never_reach_pretraining():
    assert world.HELD_OUT and set(world.HELD_OUT).isdisjoint(world.SEEN)
    assert len(world.SEEN) + len(world.HELD_OUT) == 5 * 6 * 5 * 3
    # each held-out combination is composed of attributes the base sees in other combinations
    for field in ("shape", "colour", "background", "style"):
        assert {getattr(a, field) for a in world.HELD_OUT} <= {getattr(a, field) for a in world.SEEN}
    novel = set(world.NOVEL_SHAPES) | set(world.NOVEL_STYLES) | set(world.NOVEL_BACKGROUNDS)
    assert not novel & {v for a in world.SEEN for v in (a.shape, a.background, a.style)}
    # every subject's class word is a word of the base's vocabulary
    assert set(world.SUBJECT_CLASS.values()) <= set(world.VOCABULARY)


def test_captions_tokenize_to_whole_words():
    tokenizer = build_components()["tokenizer"]
    a = A("triangle", "purple", "sky", "painting")
    text = world.caption(a)
    assert text == "a painting of a purple triangle in the sky"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.split()) + 2 <= MAX_LENGTH  # BOS, one id per word, EOS
    rng = np.random.default_rng(0)
    dropped = {world.caption(a, rng, drop=0.5) for _ in range(200)}
    assert "a triangle" in dropped and text in dropped  # every attribute can be left out, or none


def test_parse_prompt_resolves_subjects_by_their_class_word():
    moon, stripes, checker = A("moon", "yellow", "white", "photo"), A("star", "green", "white", "stripes"), \
        A("circle", "orange", "checker", "photo")
    named, identity = parse_prompt("a sketch of a [V1] on grass", [("[V1]", "circle")], [moon])
    assert named == {"style": "sketch", "background": "grass"}
    assert identity == [("shape", "moon"), ("colour", "yellow")]
    named, identity = parse_prompt("a photo of a blue [V1] in the sky", [("[V1]", "circle")], [moon])
    assert named == {"style": "photo", "colour": "blue", "background": "sky"}
    assert identity == [("shape", "moon")]  # a colour in the prompt recolours the subject
    named, identity = parse_prompt("a [V2] of a [V1] on grass", [("[V1]", "circle"), ("[V2]", "painting")],
                                   [moon, stripes])
    assert named == {"style": "stripes", "background": "grass"}  # "in the style of [V2]" is a style attribute
    assert identity == [("style", "stripes"), ("shape", "moon"), ("colour", "yellow")]
    named, _ = parse_prompt("a painting of a [V1] on [V2]", [("[V1]", "circle"), ("[V2]", "brick")], [moon, checker])
    assert named == {"style": "painting", "background": "checker"}


@pytest.fixture(scope="module")
def judge():
    return WorldJudge()


def _renders(n, seed):
    rng = np.random.default_rng(seed)
    attrs = [world.random_attrs(rng) for _ in range(n)]
    return world.render_many(attrs, seed), attrs


def test_judge_reads_fresh_ground_truth(judge):
    images, attrs = _renders(300, seed=2024)  # seeds the judge never trained on, novel attributes included
    read = judge.read(images)
    for head in HEADS:
        acc = np.mean([getattr(r, head) == getattr(a, head) for r, a in zip(read, attrs)])
        assert acc >= 0.97, (head, acc)


def test_judge_reads_renders_through_the_world_vae(judge):
    images, attrs = _renders(200, seed=77)
    read = judge.read(vae_roundtrip(load_base("world").vae, images))
    for head in HEADS:
        acc = np.mean([getattr(r, head) == getattr(a, head) for r, a in zip(read, attrs)])
        assert acc >= 0.95, (head, acc)


def test_judge_scores_prompt_alignment_and_subject_fidelity(judge):
    refs = [world.render(A("moon", "yellow", "white", "photo"), 100 + i) for i in range(3)]
    subjects = [("[V1]", "circle")]
    prompt = "a sketch of a [V1] on grass"

    def score(attrs):
        images = [world.render(attrs, s) for s in range(6)]
        return judge.score(np.stack(images), prompt, subjects, [np.stack(refs)])

    right = score(A("moon", "yellow", "grass", "sketch"))  # what the prompt asks for
    overfit = score(A("moon", "yellow", "white", "photo"))  # the references' context again
    generic = score(A("circle", "blue", "grass", "sketch"))  # the class, not the subject
    assert right["judge_text"] > 0.9 and right["judge_subject"] > 0.9 and right["judge_success"] == 1.0
    assert overfit["judge_text"] < 0.1 and overfit["judge_subject"] > 0.9 and overfit["judge_success"] == 0.0
    assert generic["judge_text"] > 0.9 and generic["judge_subject"] < 0.1 and generic["judge_success"] == 0.0
    assert right["composite"] > max(overfit["composite"], generic["composite"]) + 0.5


def test_world_base_loads_like_any_diffusers_model():
    base = load_base("world")
    pipe = StableDiffusionPipeline.from_pretrained(WORLD_DIR)  # the stock loader, from the packaged directory
    for name, part in (("unet", "denoiser"), ("vae", "vae"), ("text_encoder", "text_encoder")):
        ours, stock = getattr(base, part).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == stock.keys() and all(torch.equal(ours[k], stock[k]) for k in ours)
    assert base.noise_scheduler.config.prediction_type == "epsilon"
    assert base.tokenizer("a sketch of a red star on grass").input_ids == \
        pipe.tokenizer("a sketch of a red star on grass").input_ids
    assert sum(f.stat().st_size for f in WORLD_DIR.rglob("*") if f.is_file()) < 20e6  # small enough to commit

