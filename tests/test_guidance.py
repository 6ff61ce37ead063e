"""CFG, personalization guidance and AlignIT on the tiny model with a perturbed (so: non-trivial) adapter."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from palp_trainer.config import SubjectSpec
from palp_trainer.config import parse_methods
from palp_trainer.sampling.guidance import AlignITProcessor, alignit, alignit_prompts, lora_row_scale, sample
from palp_trainer.sampling.pipeline import generate, pipeline_from

from tests.conftest import tiny_config, trained_looking

PLACEHOLDERS = {"[V1]": "cat", "[V2]": "dog"}
PROMPT = "A sketch of [V1] and [V2]"
KW = dict(seeds=(0, 1), steps=2, guidance_scale=5.0, batch_size=2, resolution=32, placeholders=PLACEHOLDERS)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    subjects = tuple(SubjectSpec(c, t, c, (), f"A photo of {t}") for t, c in PLACEHOLDERS.items())
    config = tiny_config((), tmp_path_factory.mktemp("run"), subjects=subjects)
    base, _ = trained_looking(config)
    return pipeline_from(base)


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def record_unet(unet):
    """Forward hook storing (sample, t, encoder_hidden_states, output) of every UNet call."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone(), out[0].clone()))
    return calls, unet.register_forward_hook(hook, with_kwargs=True)


# --- parse_methods ----------------------------------------------------------------------------------------

def test_parse_methods_expands_omega_grid():
    assert parse_methods(["cfg", {"pg": {"omega": [0.4, 0.6, 0.8]}}, "alignit", {"pg": {"omega": 0}}]) == [
        ("cfg", "cfg", {}), ("pg-0.4", "pg", {"omega": 0.4}), ("pg-0.6", "pg", {"omega": 0.6}),
        ("pg-0.8", "pg", {"omega": 0.8}), ("alignit", "alignit", {}), ("pg-0", "pg", {"omega": 0.0})]
    assert parse_methods(["pg"]) == [("pg-0.6", "pg", {"omega": 0.6})]


@pytest.mark.parametrize("spec, message", [
    (["cfg", "dreambooth"], r"methods\[1\]: unknown method 'dreambooth'"),
    ([{"pg": {"omega": [0.5, 1.5]}}], r"methods\[0\]: pg: ω must be a number in \[0, 1\].*1\.5"),
    ([{"pg": {"omega": "high"}}], r"methods\[0\]: pg"),
    ([{"alignit": {"omega": 0.5}}], r"methods\[0\]: 'alignit' has no option 'omega'"),
    (["pg", {"pg": {"omega": 0.6}}], r"'pg-0.6' is listed twice"),
    ([3], r"methods\[0\]"),
    ("cfg", "non-empty list"),
])
def test_parse_methods_names_the_bad_entry(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(spec)


# --- personalization guidance ----------------------------------------------------------------------------

def test_pg_at_omega_one_is_plain_cfg(pipe):
    cfg = pixels(generate(pipe, PROMPT, (0, 1), 2, 5.0, 2, 32))
    assert np.array_equal(pixels(sample(pipe, PROMPT, "cfg", **KW)), cfg)
    assert np.array_equal(pixels(sample(pipe, PROMPT, "pg", omega=1.0, **KW)), cfg)
    assert np.abs(pixels(sample(pipe, PROMPT, "pg", omega=0.0, **KW)) - cfg).max() > 0


@pytest.mark.parametrize("omega", [0.0, 0.5])
def test_pg_weak_branch_is_the_lora_at_scale_omega(pipe, omega):
    calls, handle = record_unet(pipe.unet)
    try:
        sample(pipe, PROMPT, "pg", omega=omega, **KW)
    finally:
        handle.remove()
    assert len(calls) == KW["steps"]
    unet = pipe.unet
    with torch.no_grad():
        for x, t, states, out in calls:
            n = x.shape[0] // 2  # [uncond; cond]
            full = unet(x[n:], t, encoder_hidden_states=states[n:]).sample
            torch.testing.assert_close(out[n:], full, atol=1e-5, rtol=1e-5)  # conditional: the adapter as trained
            if omega == 0:  # θ_0 = θ_pre: the LoRA disabled
                unet.disable_adapters()
                try:
                    weak = unet(x[:n], t, encoder_hidden_states=states[:n]).sample
                finally:
                    unet.enable_adapters()
            else:  # diffusers' own LoRA scale
                weak = unet(x[:n], t, encoder_hidden_states=states[:n], cross_attention_kwargs={"scale": omega}).sample
            torch.testing.assert_close(out[:n], weak, atol=1e-5, rtol=1e-5)
            strong = unet(x[:n], t, encoder_hidden_states=states[:n]).sample
            assert (out[:n] - strong).abs().max() > 1e-3  # the weak branch really is weaker


def test_pg_needs_cfg_and_a_lora(pipe):
    with pytest.raises(ValueError, match="guidance_scale must be > 1"):
        sample(pipe, PROMPT, "pg", **{**KW, "guidance_scale": 1.0})
    with pytest.raises(ValueError, match="unknown 'dpo'"):
        sample(pipe, PROMPT, "dpo", **KW)
    with pytest.raises(ValueError, match="no LoRA layers"):
        with lora_row_scale(torch.nn.Linear(2, 2), 0.5, 1.0):
            pass


@pytest.mark.parametrize("method", ["cfg", "pg", "alignit"])
def test_one_batched_unet_call_per_step(pipe, method):
    calls, handle = record_unet(pipe.unet)
    try:
        sample(pipe, PROMPT, method, **{**KW, "steps": 3, "seeds": (0, 1, 2), "batch_size": 3})
    finally:
        handle.remove()
    assert [c[0].shape[0] for c in calls] == [6, 6, 6]  # 3 steps, 2 x 3 seeds (∅ and y) in each


# --- AlignIT ----------------------------------------------------------------------------------------------

def test_alignit_prompts_align_class_word_and_placeholder_spans(pipe):
    tok = pipe.tokenizer
    star, v1, v2 = tok.convert_tokens_to_ids(["*</w>", "[V1]", "[V2]"])
    prompts = alignit_prompts(tok, PROMPT, PLACEHOLDERS)
    assert prompts.base_prompt == "A sketch of cat and dog"
    # <bos> a sketch of cat and dog <eos>: the class words sit at 4 and 6
    assert prompts.positions == (4, 6)
    ids = prompts.personal_ids[0].tolist()
    assert ids[:8] == [tok.bos_token_id, star, star, star, v1, star, v2, tok.eos_token_id]
    assert len(ids) == tok.model_max_length

    # a class word of 5 tokens (the tiny BPE spells "zebra" letter by letter): p′ = "* * * * [V2]" there
    prompts = alignit_prompts(tok, "[V2] on a rock, [V1]", {"[V1]": "cat", "[V2]": "zebra"})
    assert prompts.base_prompt == "zebra on a rock, cat"
    whole = tok(prompts.base_prompt).input_ids
    assert prompts.positions == (1, 2, 3, 4, 5, 10) and tok.decode(whole[1:6]).replace(" ", "") == "zebra"
    assert prompts.personal_ids[0, 1:6].tolist() == [star] * 4 + [v2]
    assert prompts.personal_ids[0, 10].item() == v1 and whole[10] == tok.convert_tokens_to_ids("cat</w>")


@pytest.mark.parametrize("prompt, message", [
    ("A sketch of a cat", "none of the placeholders"),
    ("A sketch of [V1]s", "tokenizes differently"),
])
def test_alignit_prompts_refuse_what_cannot_align(pipe, prompt, message):
    with pytest.raises(ValueError, match=message):
        alignit_prompts(pipe.tokenizer, prompt, PLACEHOLDERS)


def test_alignit_patches_every_cross_attention_layer_and_no_self_attention(pipe):
    unet = pipe.unet
    before = unet.attn_processors
    prompts = alignit_prompts(pipe.tokenizer, PROMPT, PLACEHOLDERS)
    with alignit(pipe, prompts, cfg=True):
        inside = unet.attn_processors
    cross = [n for n in before if unet.get_submodule(n.removesuffix(".processor")).is_cross_attention]
    assert cross and all(n.endswith("attn2.processor") for n in cross)
    assert {n for n, p in inside.items() if isinstance(p, AlignITProcessor)} == set(cross)
    assert all(inside[n] is before[n] for n in before if n not in cross)  # self-attention untouched
    assert all(unet.attn_processors[n] is before[n] for n in before)  # restored on exit


def test_alignit_infuses_the_personalized_kv_at_both_placeholders_only(pipe):
    unet, encoder = pipe.unet, pipe.text_encoder
    prompts = alignit_prompts(pipe.tokenizer, PROMPT, PLACEHOLDERS)
    pos, others = list(prompts.positions), [i for i in range(77) if i not in prompts.positions]
    with torch.no_grad():
        # what the pipeline feeds the UNet: [∅; p], base text encoder
        cond, uncond = pipe.encode_prompt(prompts.base_prompt, "cpu", 1, True)
        states = torch.cat([uncond, cond])  # [2, 77, 32]
        personal_states = encoder(prompts.personal_ids)[0]  # p′: learned placeholder rows
        attns = {n: unet.get_submodule(n.removesuffix(".processor")) for n in unet.attn_processors}
        cross = {n: a for n, a in attns.items() if a.is_cross_attention}
        personal = {n: (a.to_k(personal_states), a.to_v(personal_states)) for n, a in cross.items()}  # LoRA on
        unet.disable_adapters()
        try:
            base = {n: (a.to_k(states), a.to_v(states)) for n, a in cross.items()}
        finally:
            unet.enable_adapters()
        with alignit(pipe, prompts, cfg=True):
            infused = {n: unet.attn_processors[n].key_value(a, states.clone()) for n, a in cross.items()}
    for name in cross:
        for got, want, mine in zip(infused[name], base[name], personal[name]):
            torch.testing.assert_close(got[0], want[0])  # ∅ row: the base model, no infusion
            torch.testing.assert_close(got[1, others], want[1, others])  # p's other tokens: the base model
            torch.testing.assert_close(got[1, pos], mine[0, pos])  # [V1] and [V2]: personalized, from p′
            assert (mine[0, pos] - want[1, pos]).abs().amax(-1).min() > 1e-3  # ... and both really differ


def test_alignit_processor_is_diffusers_attention_when_nothing_changes(pipe):
    torch.manual_seed(1)
    name = next(n for n in pipe.unet.attn_processors if n.endswith("attn2.processor"))
    attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
    hidden, states = torch.randn(2, 64, attn.query_dim), torch.randn(2, 77, 32)
    pos = (2, 5)
    with torch.no_grad():  # infuse the K, V the base model has there anyway
        proc = AlignITProcessor(attn.to_k(states[1, list(pos)]), attn.to_v(states[1, list(pos)]), pos, cfg=True)
        torch.testing.assert_close(proc(attn, hidden, states), AttnProcessor2_0()(attn, hidden, states))


def test_alignit_samples_the_base_model_on_the_clean_prompt(pipe):
    got = pixels(sample(pipe, PROMPT, "alignit", **KW))
    clean = "A sketch of cat and dog"
    pipe.unet.disable_adapters()
    try:
        base = pixels(generate(pipe, clean, (0, 1), 2, 5.0, 2, 32))
    finally:
        pipe.unet.enable_adapters()
    cfg = pixels(sample(pipe, PROMPT, "cfg", **KW))
    assert np.abs(got - base).max() > 0 and np.abs(got - cfg).max() > 0
    # without the infusion, AlignIT's sampler is exactly the base model on p
    prompts = alignit_prompts(pipe.tokenizer, PROMPT, PLACEHOLDERS)
    empty = type(prompts)(prompts.base_prompt, prompts.personal_ids, ())
    with alignit(pipe, empty, cfg=True):
        assert np.array_equal(pixels(generate(pipe, clean, (0, 1), 2, 5.0, 2, 32)), base)
