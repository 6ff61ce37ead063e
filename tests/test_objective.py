"""The PALP objective (Sec. 4) on the tiny model, checked against autograd and the paper's equations."""

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from palp_trainer import losses
from palp_trainer.loop import build, make_optimizer
from palp_trainer.models import load_base
from palp_trainer.task import PalpModel, PalpTask, tokenize
from tests.conftest import tiny_config

DEVICE = torch.device("cpu")


def make_task(images, tmp_path, **overrides):
    config = tiny_config(images, tmp_path, **overrides)
    base, embedding, lora = build(config, DEVICE)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    from palp_trainer.data import SubjectLatents
    data = SubjectLatents(base.vae, [s.images for s in config.subjects], 32, True, False, DEVICE, torch.float32)
    task = PalpTask(config, base, PalpModel(base.unet, base.text_encoder), embedding.first_id, DEVICE, torch.float32)
    batch = task.make_batch(torch.Generator().manual_seed(0), data, 2)
    return task, base, embedding, lora, batch, data


def personalization_forward(task, batch):
    alpha_bar = task.alphas_cumprod[batch["t"]]
    x_t = losses.add_noise(batch["latents"], batch["eps"], alpha_bar)
    eps_pred, enc = task.model(x_t, batch["t"], task.prompt_ids[batch["subject"]])
    return x_t, eps_pred, enc, alpha_bar


def adapters_on(unet) -> bool:
    return not any(m.disable_adapters for m in unet.modules() if isinstance(m, BaseTunerLayer))


class UNetCalls:
    """Records each UNet call: adapter state, batch size, inputs."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)
        self.unet = unet

    def hook(self, module, args, kwargs):
        sample, t, enc = args[:3]
        self.calls.append({"lora": adapters_on(self.unet), "n": len(sample), "sample": sample.clone(),
                           "enc": enc.clone()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_a_surrogate_gradient_equals_eq6_times_dx0_dtheta(subject_images, tmp_path):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path)
    params = lora + [embedding.rows]
    x_t, eps_pred, enc, alpha_bar = personalization_forward(task, batch)
    x0_hat = losses.predict_x0(x_t, eps_pred, alpha_bar)
    g = task.alignment_branch(x0_hat, batch, enc)["score"]
    surrogate = losses.score_distillation(x0_hat, g)
    got = torch.autograd.grad(surrogate, params, retain_graph=True)
    # w̃(t)·(G^α − G^β)·∂x̂_0/∂θ, explicitly (the 1/numel matches the mean-reduced Eq. 1)
    want = torch.autograd.grad(x0_hat, params, grad_outputs=g / x0_hat.numel(), retain_graph=True)
    # Eq. 7: ∂x̂_0/∂θ = −√(1−ᾱ)/√ᾱ · ∂G_θLoRA(x_t, y_P)/∂θ; with the rescale that is −(G^α − G^β)·∂G/∂θ
    a = alpha_bar.view(-1, 1, 1, 1)
    eq7 = torch.autograd.grad(eps_pred, params, grad_outputs=-(1 - a).sqrt() / a.sqrt() * g / x0_hat.numel())
    for p, x, y, z in zip(params, got, want, eq7):
        assert x.abs().max() > 0, "LoRA must receive an alignment gradient"
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(x, z, rtol=1e-4, atol=1e-9)


def test_b_pretrained_branch_ignores_lora_and_placeholders(subject_images, tmp_path):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 700])
    before = task.pretrained(x, t, task.empty_enc, task.clean_enc)
    with torch.no_grad():
        for p in lora:
            p.mul_(3.0).add_(0.1)
        embedding.rows.add_(1.0)
    after = task.pretrained(x, t, task.empty_enc, task.clean_enc)
    # and it is the untouched base model: a fresh tiny UNet with no adapter at all
    fresh = load_base("tiny")
    clean = fresh.text_encoder(tokenize(fresh.tokenizer, ["A sketch of cat"], DEVICE))[0]
    with torch.no_grad():
        reference = fresh.unet(x, t, clean.expand(2, -1, -1)).sample
    for b, a in zip(before, after):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(after[1], reference, rtol=1e-5, atol=1e-6)
    assert adapters_on(base.unet), "the adapter must be re-enabled after the pre-trained call"


def test_c_pretrained_branch_sees_no_placeholder(subject_images, tmp_path):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path)
    for ids in (task.clean_ids, task.empty_ids, task.negative_ids):
        assert (ids < embedding.first_id).all()
    assert (task.prompt_ids >= embedding.first_id).any()  # while y_P does carry [V1]
    x_t, eps_pred, enc, alpha_bar = personalization_forward(task, batch)
    with UNetCalls(base.unet) as rec:
        task.alignment_branch(losses.predict_x0(x_t, eps_pred, alpha_bar), batch, enc)
    fresh = load_base("tiny")
    with torch.no_grad():
        clean = fresh.text_encoder(tokenize(fresh.tokenizer, ["A sketch of cat"], DEVICE))[0]
    pretrained_calls = [c for c in rec.calls if not c["lora"]]
    assert len(pretrained_calls) == 1
    torch.testing.assert_close(pretrained_calls[0]["enc"][2:], clean.expand(2, -1, -1))


@pytest.mark.parametrize("same_noise", [True, False])
def test_d_same_noise_reuses_the_personalization_eps(subject_images, tmp_path, same_noise):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path, same_noise=same_noise)
    assert (batch["eps_align"] is batch["eps"]) == same_noise
    if not same_noise:
        assert not torch.allclose(batch["eps_align"], batch["eps"])
    x_t, eps_pred, enc, alpha_bar = personalization_forward(task, batch)
    x0_hat = losses.predict_x0(x_t, eps_pred, alpha_bar)
    with UNetCalls(base.unet) as rec:
        task.alignment_branch(x0_hat, batch, enc)
    expected = losses.add_noise(x0_hat.detach(), batch["eps_align"], alpha_bar)
    torch.testing.assert_close(rec.calls[0]["sample"][:2], expected)
    if same_noise:  # x̂_t = √ᾱ·x̂_0 + √(1−ᾱ)·ε with the very ε of Eq. 1
        torch.testing.assert_close(rec.calls[0]["sample"][:2],
                                   losses.add_noise(x0_hat.detach(), batch["eps"], alpha_bar))


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_e_cfg_combination_and_personalized_calls(subject_images, tmp_path, beta):
    alpha = 7.5
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path, alpha=alpha, beta=beta)
    x_t, eps_pred, enc, alpha_bar = personalization_forward(task, batch)
    x0_hat = losses.predict_x0(x_t, eps_pred, alpha_bar)
    with UNetCalls(base.unet) as rec:
        out = task.alignment_branch(x0_hat, batch, enc)
    x_hat_t = rec.calls[0]["sample"][:2]
    t = batch["t"]
    with torch.no_grad():
        base.unet.disable_adapters()
        uncond = base.unet(x_hat_t, t, task.empty_enc.expand(2, -1, -1)).sample
        cond = base.unet(x_hat_t, t, task.clean_enc.expand(2, -1, -1)).sample
        base.unet.enable_adapters()
        p_cond = base.unet(x_hat_t, t, enc).sample
        p_uncond = base.unet(x_hat_t, t, task.empty_enc.expand(2, -1, -1)).sample
    torch.testing.assert_close(out["pretrained"], (1 - alpha) * uncond + alpha * cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["personalized"], (1 - beta) * p_uncond + beta * p_cond, rtol=1e-4, atol=1e-5)
    personalized_calls = [c for c in rec.calls if c["lora"]]
    assert len(personalized_calls) == 1  # β ≠ 1 batches uncond + cond into the one call
    assert personalized_calls[0]["n"] == (2 if beta == 1.0 else 4)
    w = alpha_bar.sqrt() / (1 - alpha_bar).sqrt()
    torch.testing.assert_close(out["score"], w.view(-1, 1, 1, 1) * (out["pretrained"] - out["personalized"]))


@pytest.mark.parametrize("alignment", ["palp", "sds", "nfsd"])
def test_f_alignment_outputs_have_no_grad_fn(subject_images, tmp_path, alignment):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path, alignment=alignment)
    x_t, eps_pred, enc, alpha_bar = personalization_forward(task, batch)
    x0_hat = losses.predict_x0(x_t, eps_pred, alpha_bar)
    assert x0_hat.grad_fn is not None
    out = task.alignment_branch(x0_hat, batch, enc)
    assert out and all(v.grad_fn is None and not v.requires_grad for v in out.values())
    terms = task.training_step(batch)
    assert set(terms) == {"denoise_loss", "align_loss"}


def test_g_only_lora_and_placeholder_rows_change(subject_images, tmp_path):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path)
    optimizer = make_optimizer(task.config, lora, embedding)
    modules = {"unet": base.unet, "text_encoder": base.text_encoder, "vae": base.vae}
    before = {f"{m}.{n}": p.detach().clone() for m, mod in modules.items() for n, p in mod.named_parameters()}
    table_before = embedding.base.weight.detach().clone()
    sum(task.training_step(batch).values()).backward()
    optimizer.step()
    changed = {n for m, mod in modules.items() for n_, p in mod.named_parameters()
               for n in [f"{m}.{n_}"] if not torch.equal(p, before[n])}
    lora_names = {f"unet.{n}" for n, p in base.unet.named_parameters() if "lora_" in n}
    assert changed <= lora_names | {"text_encoder.embeddings.token_embedding.rows"}
    assert "text_encoder.embeddings.token_embedding.rows" in changed
    assert any(n.endswith("lora_B.default.weight") for n in changed)
    assert torch.equal(embedding.base.weight, table_before)  # every other row bit-identical


def test_none_alignment_is_plain_lora_ti(subject_images, tmp_path):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path, alignment="none")
    with UNetCalls(base.unet) as rec:
        terms = task.training_step(batch)
    assert set(terms) == {"denoise_loss"} and len(rec.calls) == 1


def test_align_every_k_runs_the_term_on_every_kth_step_at_k_times_lambda(subject_images, tmp_path):
    """Between alignment steps the step is the plain LoRA+TI step (one UNet call); on them, the term is k·λ
    times the every-step term, so the expected alignment gradient per step is the paper's."""
    params = lambda lora, embedding: lora + [embedding.rows]
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path / "k3", align_every=3)
    assert [task.aligns_at(s) for s in range(7)] == [True, False, False, True, False, False, True]
    with UNetCalls(base.unet) as rec:
        skipped = task.training_step(batch, align=False)
    assert set(skipped) == {"denoise_loss"} and len(rec.calls) == 1
    k3 = task.training_step(batch)
    k3_grads = torch.autograd.grad(k3["align_loss"], params(lora, embedding))
    torch.manual_seed(0)  # the same LoRA perturbation as make_task's first call (conftest seeds 0 too)
    plain = make_task(subject_images, tmp_path / "plain", alignment="none")
    torch.testing.assert_close(skipped["denoise_loss"], plain[0].training_step(batch)["denoise_loss"])
    torch.manual_seed(0)
    every, _, embedding1, lora1, _, _ = make_task(subject_images, tmp_path / "k1")
    k1 = every.training_step(batch)
    k1_grads = torch.autograd.grad(k1["align_loss"], params(lora1, embedding1))
    torch.testing.assert_close(k3["align_loss"], 3 * k1["align_loss"])
    for g3, g1 in zip(k3_grads, k1_grads):
        torch.testing.assert_close(g3, 3 * g1, rtol=1e-5, atol=1e-5 * g1.abs().max().item())


def test_sds_and_nfsd_scores_follow_their_equations():
    g_alpha, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    w = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(losses.sds_score(g_alpha, eps, w), w.view(-1, 1, 1, 1) * (g_alpha - eps))
    u, c, n = torch.randn(3, 2, 4, 8, 8)
    t = torch.tensor([100, 500])
    got = losses.nfsd_score(u, c, n, t, 7.5, torch.ones(2))
    torch.testing.assert_close(got[0], 7.5 * (c[0] - u[0]) + u[0])
    torch.testing.assert_close(got[1], 7.5 * (c[1] - u[1]) + u[1] - n[1])


def test_timestep_weight_undoes_eq7_scale():
    alpha_bar = torch.tensor([0.9, 0.5, 0.01])
    w = losses.timestep_weight(alpha_bar, rescale=True)
    torch.testing.assert_close(w * (1 - alpha_bar).sqrt() / alpha_bar.sqrt(), torch.ones(3))
    assert torch.equal(losses.timestep_weight(alpha_bar, rescale=False), torch.ones(3))
