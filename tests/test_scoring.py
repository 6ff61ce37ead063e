"""Scores against direct computations on the tiny CLIP / DINO, composite math, placeholder replacement."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from palp_trainer.evaluation.clip import (CLIP_MEAN, CLIP_STD, COMPOSITE_EPS, SCORE_CONVENTION, Scorer, composite,
                                  placeholders_in, replace_placeholders)


def images(n, seed, size=(48, 48)):
    """n smooth random RGB images made in code."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((4, 4, 3)) * 255).astype("uint8")).resize(size, Image.BILINEAR)
            for _ in range(n)]


@pytest.fixture(scope="module")
def scorer():
    return Scorer("tiny", dino_model="tiny")


def direct_image_features(scorer, imgs):
    # the model's own projected embedding, unnormalized: [N, 16]
    pixels = scorer.clip_processor(images=imgs, return_tensors="pt").pixel_values
    with torch.no_grad():
        return scorer.clip_model.get_image_features(pixel_values=pixels).pooler_output


def direct_text_features(scorer, text):
    ids = scorer.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return scorer.clip_model.get_text_features(**ids).pooler_output  # [1, 16]


def test_preprocessing_is_clips_resize_and_normalization(scorer):
    img = images(1, seed=0)[0]
    expected = (np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    pixels = scorer.clip_processor(images=[img], return_tensors="pt").pixel_values[0]  # [3, 32, 32]
    torch.testing.assert_close(pixels, torch.from_numpy(expected).permute(2, 0, 1).float(), atol=1e-4, rtol=0)


def test_features_are_unit_norm(scorer):
    feats = scorer.image_features(images(3, seed=0))
    text = scorer.text_features(["a photo of a cat", "a dog"])
    assert feats.shape == (3, 16) and text.shape == (2, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_text_features_do_not_depend_on_batch_padding(scorer):
    short, long = "a cat", "an oil painting of a cat sitting in the snow at night"
    batched = scorer.text_features([short, long])
    torch.testing.assert_close(batched[0], scorer.text_features([short])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[1], scorer.text_features([long])[0], atol=1e-6, rtol=0)


def test_clip_t_is_mean_raw_cosine_to_the_text(scorer):
    imgs, text = images(3, seed=0), "a sketch of a cat"
    img, txt = direct_image_features(scorer, imgs), direct_text_features(scorer, text)
    expected = F.cosine_similarity(img, txt.expand_as(img), dim=-1).mean().item()
    assert scorer.clip_t(imgs, text) == pytest.approx(expected, abs=1e-6)


def test_clip_i_is_mean_over_all_pairs(scorer):
    imgs, refs = images(3, seed=0), images(2, seed=1)
    img, ref = direct_image_features(scorer, imgs), direct_image_features(scorer, refs)
    expected = np.mean([F.cosine_similarity(a, b, dim=0).item() for a in img for b in ref])
    assert scorer.clip_i(imgs, refs) == pytest.approx(expected, abs=1e-6)
    assert scorer.clip_i(imgs[:1], imgs[:1]) == pytest.approx(1.0, abs=1e-6)


def test_dino_is_mean_cls_cosine(scorer):
    imgs, refs = images(2, seed=0), images(3, seed=1)
    with torch.no_grad():
        cls = [scorer.dino_model(pixel_values=scorer.dino_processor(images=x, return_tensors="pt").pixel_values)
               .last_hidden_state[:, 0] for x in (imgs, refs)]
    expected = np.mean([F.cosine_similarity(a, b, dim=0).item() for a in cls[0] for b in cls[1]])
    assert scorer.dino(imgs, refs) == pytest.approx(expected, abs=1e-6)
    assert Scorer("tiny").dino(imgs, refs) is None


def test_composition_scores_each_subject_against_its_own_references(scorer):
    imgs, cat, mug = images(2, seed=0), images(2, seed=1), images(3, seed=2, size=(40, 56))
    out = scorer.score(imgs, "a cat and a mug", [cat, mug])
    assert out["clip_i/0"] == pytest.approx(scorer.clip_i(imgs, cat), abs=1e-6)
    assert out["clip_i/1"] == pytest.approx(scorer.clip_i(imgs, mug), abs=1e-6)
    assert out["clip_i/0"] != pytest.approx(out["clip_i/1"], abs=1e-4)
    assert out["clip_i"] == pytest.approx((out["clip_i/0"] + out["clip_i/1"]) / 2)
    assert out["dino/0"] == pytest.approx(scorer.dino(imgs, cat), abs=1e-6)
    assert out["dino/1"] == pytest.approx(scorer.dino(imgs, mug), abs=1e-6)
    swapped = scorer.score(imgs, "a cat and a mug", [mug, cat])
    assert swapped["clip_i/0"] == pytest.approx(out["clip_i/1"], abs=1e-6)


def test_score_keys_elements_and_composite(scorer):
    imgs, refs = images(2, seed=0), images(2, seed=1)
    out = scorer.score(imgs, "a sketch of a cat", [refs], elements=("sketch", "cat"), weight_text=2.0)
    assert set(out) == {"clip_t", "clip_i", "dino", "clip_t/sketch", "clip_t/cat", "composite"}
    assert out["clip_t"] == pytest.approx(scorer.clip_t(imgs, "a sketch of a cat"), abs=1e-6)
    assert out["clip_t/sketch"] == pytest.approx(scorer.clip_t(imgs, "sketch"), abs=1e-6)
    assert out["clip_i"] == pytest.approx(scorer.clip_i(imgs, refs), abs=1e-6)
    assert out["composite"] == pytest.approx(composite(out["clip_t"], out["clip_i"], 2.0, 1.0))
    assert "dino" not in Scorer("tiny").score(imgs, "a cat", [refs])


def test_score_rejects_missing_images(scorer):
    with pytest.raises(ValueError, match="no images"):
        scorer.score([], "a cat", [images(1, seed=0)])
    with pytest.raises(ValueError, match="reference images per subject"):
        scorer.score(images(1, seed=0), "a cat", [images(1, seed=1), []])


def test_local_directories_load_through_from_pretrained(scorer, tmp_path):
    # the hub path (CLIPModel / AutoModel.from_pretrained) on saved tiny models gives the same scores
    for part in (scorer.clip_model, scorer.clip_processor, scorer.tokenizer):
        part.save_pretrained(tmp_path / "clip")
    for part in (scorer.dino_model, scorer.dino_processor):
        part.save_pretrained(tmp_path / "dino")
    loaded = Scorer(str(tmp_path / "clip"), dino_model=str(tmp_path / "dino"))
    imgs, refs = images(2, seed=0), images(2, seed=1)
    expected = scorer.score(imgs, "a cat", [refs], elements=("cat",))
    assert loaded.score(imgs, "a cat", [refs], elements=("cat",)) == pytest.approx(expected, abs=1e-6)
    assert {k: v for k, v in loaded.describe().items() if not k.endswith("_model")} == \
        {k: v for k, v in scorer.describe().items() if not k.endswith("_model")}


def test_describe_records_checkpoints_and_preprocessing(scorer):
    d = scorer.describe()
    assert d["score_convention"] == SCORE_CONVENTION and "raw cosine" in SCORE_CONVENTION
    assert (d["clip_model"], d["dino_model"]) == ("tiny", "tiny")
    assert d["clip_resolution"] == "32x32" and d["dino_resolution"] == "32x32"
    assert d["clip_mean"] == pytest.approx(CLIP_MEAN) and d["clip_std"] == pytest.approx(CLIP_STD)
    assert "dino_resolution" not in Scorer("tiny").describe()


def test_composite_is_weighted_geometric_mean():
    assert composite(0.25, 0.64) == pytest.approx(0.4)
    assert composite(0.5, 0.125, weight_text=2, weight_image=1) == pytest.approx((0.5 ** 2 * 0.125) ** (1 / 3))
    assert composite(0.3, 0.7, weight_text=1, weight_image=0) == pytest.approx(0.3)
    assert composite(0.3, 0.7, 2, 2) == pytest.approx(composite(0.3, 0.7))


def test_composite_clamps_non_positive_cosines_and_keeps_nan():
    assert composite(-0.2, 0.5) == pytest.approx(math.sqrt(COMPOSITE_EPS * 0.5))
    assert composite(0.0, 0.5) == composite(-0.9, 0.5)
    assert math.isnan(composite(float("nan"), 0.5))
    with pytest.raises(ValueError, match="weights"):
        composite(0.3, 0.5, weight_text=0, weight_image=0)
    with pytest.raises(ValueError, match="weights"):
        composite(0.3, 0.5, weight_text=-1)


def test_replace_placeholders():
    two = {"[V1]": "cat", "[V2]": "mug"}
    assert replace_placeholders("An oil painting of [V1] next to [V2]", two) == "An oil painting of cat next to mug"
    assert replace_placeholders("[V1]'s hat, [V1], and [V2].", two) == "cat's hat, cat, and mug."
    both = {"[V1]": "cat", "[V10]": "dog"}
    assert replace_placeholders("[V10] chases [V1]", both) == "dog chases cat"
    assert replace_placeholders("[V1] chases [V10]", {"[V1]": "cat"}) == "cat chases [V10]"
    assert replace_placeholders("a sks dog, sksx, sks's", {"sks": "toy"}) == "a toy dog, sksx, toy's"
    assert replace_placeholders("a photo of [V1]", {}) == "a photo of [V1]"


def test_placeholders_in_order_of_appearance():
    assert placeholders_in("[V2] and [V10], then [V1] and [V2] again", ["[V1]", "[V2]", "[V10]"]) == \
        ["[V2]", "[V10]", "[V1]"]
    assert placeholders_in("a photo of a cat", ["[V1]"]) == []
    with pytest.raises(ValueError, match="non-empty"):
        placeholders_in("a cat", [""])


def test_each_scorer_kind_reports_its_two_axes_and_the_composite():
    """scorers.py: the one place a scorer is chosen; each kind's axes are among the scores it reports."""
    from palp_trainer.config import SCORERS as NAMES
    from palp_trainer.config import EvalConfig
    from palp_trainer.evaluation.scorers import SCORERS, metric_names, score_names

    assert tuple(SCORERS) == NAMES
    for name in NAMES:
        ev = EvalConfig(scorer=name, elements=("a sketch",))
        assert set(metric_names(ev)) < set(score_names(ev)) and score_names(ev)[-1] == "composite", name
    assert score_names(EvalConfig(scorer="clip", dino_model="d", elements=("a sketch",))) == (
        "clip_t", "clip_i", "dino", "clip_t/a sketch", "composite")
    assert metric_names(EvalConfig()) == ("clip_t", "clip_i")  # unresolved (None): CLIP
