"""Base loading (tiny and from_pretrained), placeholders and LoRA placement."""

import json
import math

import pytest
import torch

from palp_trainer.families.base import LORA_TARGETS, add_lora, add_placeholders, load_base
from palp_trainer.families.tiny import main as tiny_main


def test_tiny_directory_loads_back_through_from_pretrained(tmp_path):
    assert tiny_main([str(tmp_path / "tiny")]) == 0
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    built, loaded = load_base("tiny"), load_base(str(tmp_path / "tiny"))
    for name in ("denoiser", "vae", "text_encoder"):
        a, b = getattr(built, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompt = "An oil painting of a cat sitting on a rock"
    assert built.tokenizer(prompt).input_ids == loaded.tokenizer(prompt).input_ids
    assert loaded.noise_scheduler.config.prediction_type == "epsilon"


def test_tiny_is_deterministic():
    a, b = load_base("tiny"), load_base("tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.denoiser.parameters(), b.denoiser.parameters()))


def test_a_v_prediction_base_trains_and_its_adapter_says_so(tmp_path, subject_images):
    """A diffusers folder whose scheduler predicts v (SD-2.x 768) loads through from_pretrained, trains (the step's
    terms against the paper: tests/test_objective.py), samples with a v-configured scheduler and exports with
    its prediction type named; an x_0-predicting one is refused, naming the field."""
    from palp_trainer.sampling.pipeline import pipeline_from
    from palp_trainer.loops.solo import train_loop
    from tests.conftest import tiny_config

    tiny_main([str(tmp_path / "v")])
    cfg = tmp_path / "v" / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction"}))
    base = load_base(str(tmp_path / "v"))
    assert pipeline_from(base).scheduler.config.prediction_type == "v_prediction"
    metrics = train_loop(tiny_config(subject_images, tmp_path / "run", base_model=str(tmp_path / "v"), steps=2))
    assert metrics["step"] == 2 and all(map(math.isfinite, (metrics["denoise_loss"], metrics["align_loss"])))
    manifest = json.loads((tmp_path / "run" / "adapter" / "manifest.json").read_text())
    assert manifest["prediction_type"] == "v_prediction"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ValueError, match=r"prediction_type='sample'; supported: epsilon, v_prediction"):
        load_base(str(tmp_path / "v"))


def test_placeholders_start_at_class_word_and_are_the_only_trainable_rows():
    base = load_base("tiny")
    table = base.text_encoder.get_input_embeddings().weight.detach().clone()
    emb = add_placeholders(base, ("[V1]", "[V2]"), ("cat", "mug"))
    for row, word in zip(emb.rows, ("cat", "mug")):
        ids = base.tokenizer(word, add_special_tokens=False).input_ids
        torch.testing.assert_close(row.detach(), table[ids].mean(0))
    assert [n for n, p in base.text_encoder.named_parameters() if p.requires_grad] == ["embeddings.token_embedding.rows"]
    ids = base.family.tokenize(base, ["A photo of [V1] and [V2]"], "cpu")
    assert (ids == emb.first_id).sum() == 1 and (ids == emb.first_id + 1).sum() == 1
    # the placeholder positions read the trainable rows
    out = base.text_encoder.get_input_embeddings()(ids)[0]
    pos = (ids[0] == emb.first_id).nonzero().item()
    torch.testing.assert_close(out[pos], emb.rows[0].detach())


def test_existing_token_is_refused_as_placeholder():
    base = load_base("tiny")
    with pytest.raises(ValueError, match="already a token"):
        add_placeholders(base, ("cat</w>",), ("cat",))


def test_lora_wraps_exactly_the_attention_projections():
    base = load_base("tiny")
    params = add_lora(base.denoiser, rank=4)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    wrapped = {n.split(".lora_")[0] for n, _ in base.denoiser.named_parameters() if "lora_A" in n}
    assert all(any(n.endswith(t) for t in LORA_TARGETS) for n in wrapped)
    attn = [n for n, m in base.denoiser.named_modules() if n.endswith((".attn1", ".attn2"))]
    assert len(wrapped) == 4 * len(attn)  # q, k, v, out in every self- and cross-attention
