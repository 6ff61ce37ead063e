"""The PALP objective (Sec. 4) on the tiny model: the trainer's step against an independent reference.

tests/palp_reference.py writes the objective out again from the paper (its own ᾱ_t, noising, x̂_0, guidance,
scores and Eq. 7 gradient; no palp_trainer.objective.losses). Every test here compares `PalpTask.training_step`'s loss
values and their gradients on the LoRA and the [V] rows with it, in fp32, to RTOL of the largest gradient
entry, for each objective option of TrainConfig. docs/mutation.md lists the mutations these tests kill.
"""

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

from palp_trainer.config import SubjectSpec
from palp_trainer.data import SubjectLatents
from palp_trainer.families.base import build
from palp_trainer.families.base import load_base
from palp_trainer.families.tiny import SD1_SCHEDULER
from palp_trainer.loops.solo import make_optimizer
from palp_trainer.objective import losses
from palp_trainer.objective.task import NFSD_NEGATIVE, FastPaths, PalpModel, PalpTask
from tests.conftest import tiny_config, write_images
from tests.numerics import ALIGN_TOL, AlignScale
from tests.palp_reference import Nets, ids_of, noise, reference_step, x0_estimate

DEVICE = torch.device("cpu")
# fp32 step against a float64-arithmetic reference that shares the networks: the denoising loss to RTOL of itself,
# the alignment term to ALIGN_TOL of the magnitudes it is computed from (tests/numerics.py: it is a small
# difference of CFG predictions, so its rounding is relative to them, not to it), every gradient to RTOL of its
# largest entry (the largest error seen is ~1e-6 of it); a wrong coefficient is >= 1e-3
RTOL = 1e-5
# SDXL gradients: one batched UNet call and separate calls differ by ~1e-6 of the outputs in fp32 (measured), which
# CFG at α = 7.5 scales up against a small alignment gradient. Wrong size conditioning is >= 1e-3.
XL_RTOL = 5e-5
PLAIN = FastPaths()
FAST = {"plain": PLAIN, "batched": FastPaths(batch_pretrained=True), "folded": FastPaths(fold_alignment=True)}


@dataclasses.dataclass
class Rig:
    """One trainer model for the read-only tests (no optimizer step): tasks differ only in their config."""

    config: object
    base: object
    embedding: object
    lora: list
    model: PalpModel
    nets: Nets
    data: SubjectLatents

    @property
    def params(self) -> list:
        return self.lora + [self.embedding.rows]

    def task(self, fast: FastPaths = PLAIN, **objective) -> PalpTask:
        config = dataclasses.replace(self.config, **objective)
        return PalpTask(config, self.base, self.model, self.embedding.first_id, DEVICE, torch.float32, fast)


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Rig:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("objective")
    # two subjects, so each sample's y_P must follow its own subject; 3 images and 1, so that drawing a subject
    # first (uniform) and drawing from the union of the images differ
    subjects = (SubjectSpec("cat", "[V1]", "cat", write_images(d / "cat", 3, seed=0), "A photo of [V1]"),
                SubjectSpec("mug", "[V2]", "mug", write_images(d / "mug", 1, seed=1), "An oil painting of [V2]"))
    config = tiny_config((), d, subjects=subjects, target_prompt="A sketch of [V1] and [V2]",
                         clean_prompt="A sketch of cat and mug")
    base, embedding, lora = build(config, DEVICE)
    with torch.no_grad():  # LoRA B starts at zero and [V] at its class word; make both matter
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
        embedding.rows.add_(0.1 * torch.randn_like(embedding.rows))
    pre = load_base("tiny")  # the pre-trained branch's reference: a base with no adapter and no [V]
    nets = Nets(base.denoiser, base.text_encoder, base.tokenizer, pre.denoiser, pre.text_encoder, pre.tokenizer,
                pre.noise_scheduler.betas)
    data = SubjectLatents(base.vae, [s.images for s in subjects], 32, True, False, DEVICE, torch.float32)
    return Rig(config, base, embedding, lora, PalpModel(base), nets, data)


def make_batch(t=(37, 612), same_noise=True, seed=0) -> dict:
    """Two samples of subjects [V2], [V1] at timesteps `t`; eps_align is eps itself when same_noise."""
    g = torch.Generator().manual_seed(seed)
    x0, eps, fresh = torch.randn(3, 2, 4, 16, 16, generator=g)
    return {"latents": x0, "subject": torch.tensor([1, 0]), "t": torch.tensor(t), "eps": eps,
            "eps_align": eps if same_noise else fresh, "time_ids": torch.tensor([[64., 48, 0, 8, 32, 32]] * 2)}


def _grad_groups(grads) -> dict:
    flat = [torch.zeros(0, dtype=torch.float64) if g is None else g.double().flatten() for g in grads]
    return {"LoRA": torch.cat(flat[:-1]), "[V] rows": flat[-1]}


def check_step(rig: Rig, t=(37, 612), same_noise=True, fast=PLAIN, align=True, rtol=RTOL, **objective):
    """training_step's terms and their gradients (each term on its own) against the reference."""
    task = rig.task(fast, same_noise=same_noise, **objective)
    batch = make_batch(t, same_noise)
    with AlignScale() as spy:
        got = task.training_step(batch, align=align)
    want = reference_step(task.config, rig.nets, batch, rig.params, align=align)
    assert set(got) == set(want)
    for name, (value, grads) in want.items():
        if name == "align_loss":  # a small difference of large predictions: to ALIGN_TOL of their scale
            scale = task.config.align_weight * task.config.align_every * spy.scales[0]
            assert abs(got[name].double() - value) <= ALIGN_TOL * scale, (name, got[name].item(), value.item(), scale)
        else:
            torch.testing.assert_close(got[name].double(), value, rtol=rtol, atol=1e-12, msg=lambda m: f"{name}: {m}")
        got_grads = torch.autograd.grad(got[name], rig.params, retain_graph=True, allow_unused=True)
        for group, w in _grad_groups(grads).items():
            g = _grad_groups(got_grads)[group]
            scale = w.abs().max()
            if scale == 0:  # the term is masked off: exactly no gradient
                assert g.abs().max() == 0, f"{name} on {group}: expected no gradient"
            else:
                err = ((g - w).abs().max() / scale).item()
                assert err <= rtol, f"{name} on {group}: gradient off by {err:.2e} of its largest entry"
    return got, want


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("alpha, beta", [(7.5, 1.0), (4.0, 2.5)])
def test_palp_step_matches_the_paper(rig, fast, alpha, beta):
    """Eq. 1 + λ·Eq. 6 with Eq. 7, β = 1 (one personalized call) and β ≠ 1 (its own CFG), on each fast path."""
    check_step(rig, fast=FAST[fast], alpha=alpha, beta=beta)


@pytest.fixture(scope="module")
def v_rig(rig) -> Rig:
    """The same networks read as a v-prediction model (SD-2.x 768): the scheduler says so, as from_pretrained's
    would; the reference converts every output itself (palp_reference.eps_of, v_target)."""
    scheduler = DDPMScheduler(**{**SD1_SCHEDULER, "prediction_type": "v_prediction"})
    return dataclasses.replace(rig, base=dataclasses.replace(rig.base, noise_scheduler=scheduler),
                               nets=dataclasses.replace(rig.nets, prediction="v_prediction"))


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("alignment, beta", [("palp", 1.0), ("palp", 2.5), ("sds", 1.0), ("nfsd", 1.0), ("none", 1.0)])
def test_v_prediction_step_matches_the_paper_in_eps(v_rig, fast, alignment, beta):
    """v-prediction: Eq. 1 on v's own target, x̂_0 = √ᾱ·x_t − √(1−ᾱ)·v̂, every alignment-branch output converted to
    ε before Eq. 4/6 and NFSD; values and gradients against the reference (t = 199, 200 straddle NFSD's switch)."""
    t = (199, 200) if alignment == "nfsd" else (199, 612)
    got, _ = check_step(v_rig, t=t, same_noise=alignment != "sds", fast=FAST[fast], alignment=alignment, beta=beta)
    if alignment != "none":  # the same outputs read as ε give another alignment term: the reference tells them apart
        as_eps = v_rig.task(FAST[fast], same_noise=alignment != "sds", alignment=alignment, beta=beta)
        as_eps.v_prediction = False
        other = as_eps.training_step(make_batch(t, alignment != "sds"))["align_loss"]
        assert abs(other - got["align_loss"]) > 0.1 * abs(got["align_loss"])


@pytest.fixture(scope="module")
def xl_rig(tmp_path_factory) -> Rig:
    """The tiny SDXL (two text encoders, pooled text and add_time_ids): the reference conditions the same UNet
    through stock StableDiffusionXLPipelines (encode_prompt, _get_add_time_ids), not through family.py."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("objective_xl")
    subjects = (SubjectSpec("cat", "[V1]", "cat", write_images(d / "cat", 2, seed=0), "A photo of [V1]"),
                SubjectSpec("mug", "[V2]", "mug", write_images(d / "mug", 1, seed=1), "An oil painting of [V2]"))
    config = tiny_config((), d, subjects=subjects, target_prompt="A sketch of [V1] and [V2]",
                         clean_prompt="A sketch of cat and mug", base_model="tiny_xl")
    base, embedding, lora = build(config, DEVICE)
    with torch.no_grad():
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
        embedding.rows.add_(0.1 * torch.randn_like(embedding.rows))  # both encoders' rows: clip_l and clip_g
    pre = load_base("tiny_xl")

    def pipe(b):
        return StableDiffusionXLPipeline(vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2,
                                         tokenizer=b.tokenizer, tokenizer_2=b.tokenizer_2, unet=b.denoiser,
                                         scheduler=EulerDiscreteScheduler(**{k: v for k, v in SD1_SCHEDULER.items() if k != "clip_sample"}))
    nets = Nets(base.denoiser, None, None, pre.denoiser, None, None, pre.noise_scheduler.betas, xl=pipe(base), pre_xl=pipe(pre))
    data = SubjectLatents(base.vae, [s.images for s in subjects], 32, True, False, DEVICE, torch.float32)
    return Rig(config, base, embedding, lora, PalpModel(base), nets, data)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("alignment, beta", [("palp", 1.0), ("palp", 2.5), ("sds", 1.0), ("nfsd", 1.0), ("none", 1.0)])
def test_sdxl_step_matches_the_paper(xl_rig, fast, alignment, beta):
    """SDXL conditioning (both encoders' [V] rows, pooled text, the photo's add_time_ids in Eq. 1, a sample's in
    the alignment branch, ∅ as zeros): the same equations, values and gradients against the reference."""
    t = (199, 200) if alignment == "nfsd" else (37, 612)
    check_step(xl_rig, t=t, same_noise=alignment != "sds", fast=FAST[fast], alignment=alignment, beta=beta,
               rtol=XL_RTOL)


def test_sdxl_placeholder_is_learned_in_both_encoders(xl_rig):
    """[V]'s gradient reaches its clip_l and its clip_g columns (one parameter, each encoder reads its own)."""
    task = xl_rig.task()
    loss = sum(task.training_step(make_batch()).values())
    (grad,) = torch.autograd.grad(loss, [xl_rig.embedding.rows])
    width = xl_rig.base.text_encoder.config.hidden_size
    assert grad.shape[-1] == width + xl_rig.base.text_encoder_2.config.hidden_size
    assert grad[:, :width].abs().sum() > 0 and grad[:, width:].abs().sum() > 0


@pytest.mark.parametrize("fast", ["plain", "batched"])
@pytest.mark.parametrize("alignment", ["sds", "nfsd"])
def test_ablation_arms_match_their_equations(rig, alignment, fast):
    """SDS (Eq. 4) and NFSD (δ_D switches at t = 200: t = 199 and 200 straddle it); fresh noise, so SDS's ε
    must be the re-noising ε, not Eq. 1's."""
    check_step(rig, t=(199, 200), same_noise=False, fast=FAST[fast], alignment=alignment, alpha=5.0)


@pytest.mark.parametrize("fast", ["plain", "folded"])
def test_align_weight_lambda_scales_the_term(rig, fast):
    got, want = check_step(rig, fast=FAST[fast], align_weight=0.37)
    assert want["align_loss"][0].abs() > 0


@pytest.mark.parametrize("align_t_range, t", [
    ((50, 700), (50, 700)),  # lo is in, hi is out
    ((100, 1000), (50, 700)),  # the low-t sample (the larger w̃) is out
    ((0, 50), (50, 700)),  # both out: the term is there, with no gradient
])
def test_align_t_range_masks_each_sample(rig, align_t_range, t):
    check_step(rig, t=t, align_t_range=align_t_range)


@pytest.mark.parametrize("alignment", ["palp", "sds"])
def test_fresh_noise_re_noises_x0_hat_while_eq1_keeps_its_eps(rig, alignment):
    check_step(rig, same_noise=False, alignment=alignment)


def test_without_rescale_the_weight_is_one(rig):
    check_step(rig, rescale=False, beta=2.0)


def test_align_every_k_weighs_the_term_k_lambda_and_skips_it_between(rig):
    """On an alignment step the term is k·λ times Eq. 6; between, the step is Eq. 1 alone (one UNet call)."""
    task = rig.task(align_every=3)
    assert [task.aligns_at(s) for s in range(7)] == [True, False, False, True, False, False, True]
    assert [rig.task(alignment="none").aligns_at(s) for s in range(2)] == [False, False]
    check_step(rig, align_every=3, align_weight=0.5)
    with UNetCalls(rig.base.denoiser) as rec:
        check_step(rig, align_every=3, align=False)
    assert len(rec.calls) == 2  # the step's one call and the reference's


def test_none_alignment_is_plain_lora_ti(rig):
    with UNetCalls(rig.base.denoiser) as rec:
        check_step(rig, alignment="none")
    assert len(rec.calls) == 2  # the step's one call and the reference's


@pytest.mark.parametrize("same_noise", [True, False])
def test_make_batch_draws_t_in_range_and_the_alignment_noise(rig, same_noise):
    task = rig.task(same_noise=same_noise, t_range=(300, 310))
    batch = task.make_batch(torch.Generator().manual_seed(0), rig.data, 64)
    assert batch["t"].min() >= 300 and batch["t"].max() <= 309 and len(batch["t"].unique()) > 5
    assert (batch["eps_align"] is batch["eps"]) == same_noise
    for eps in (batch["eps"], batch["eps_align"]):
        assert eps.shape == batch["latents"].shape and abs(eps.std().item() - 1) < 0.05
    if not same_noise:
        assert abs(torch.corrcoef(torch.stack([batch["eps"].flatten(), batch["eps_align"].flatten()]))[0, 1]) < 0.05
    for x0, s in zip(batch["latents"], batch["subject"]):  # each latent is an image of its own subject
        rows = rig.data.latents[rig.data.subject == s]
        assert any(torch.equal(x0, r) for r in rows)
    assert rig.task(t_range=(999, 1000)).make_batch(torch.Generator(), rig.data, 4)["t"].tolist() == [999] * 4
    # rank r of w sees rows [r·B/w, (r+1)·B/w) of what one worker at the global batch sees
    whole = task.make_batch(torch.Generator().manual_seed(1), rig.data, 4)
    for rank, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
        half = task.make_batch(torch.Generator().manual_seed(1), rig.data, 4, rank=rank, world_size=2)
        for k in whole:
            torch.testing.assert_close(half[k], whole[k][rows], rtol=0, atol=0)


@pytest.mark.parametrize("sampling, mug_share", [("uniform", 1 / 2), ("union", 1 / 4)])
def test_subject_sampling_uniform_over_subjects_or_over_the_union(rig, sampling, mug_share):
    batch = rig.task(subject_sampling=sampling).make_batch(torch.Generator().manual_seed(0), rig.data, 2000)
    assert abs((batch["subject"] == 1).float().mean().item() - mug_share) < 0.04  # 4 sigma at n = 2000


def adapters_on(unet) -> bool:
    return not any(m.disable_adapters for m in unet.modules() if isinstance(m, BaseTunerLayer))


class UNetCalls:
    """Records each UNet call: adapter state, batch size, inputs."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)
        self.unet = unet

    def hook(self, module, args, kwargs):
        sample, t = args[:2]
        enc = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        self.calls.append({"lora": adapters_on(self.unet), "n": len(sample), "sample": sample.clone(),
                           "enc": enc.clone()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def make_task(images, tmp_path, **overrides):
    """A task on its own freshly built model (for the tests that step the optimizer)."""
    config = tiny_config(images, tmp_path, **overrides)
    base, embedding, lora = build(config, DEVICE)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    data = SubjectLatents(base.vae, [s.images for s in config.subjects], 32, True, False, DEVICE, torch.float32)
    task = PalpTask(config, base, PalpModel(base), embedding.first_id, DEVICE, torch.float32)
    batch = task.make_batch(torch.Generator().manual_seed(0), data, 2)
    return task, base, embedding, lora, batch, data


def personalization_forward(rig, task, batch):
    """x_t, G_θ(x_t, y_P), the y_P encoding and x̂_0, with the reference's ᾱ_t, noising and Eq. 2."""
    abar = torch.cumprod(1 - rig.nets.betas.double(), 0)[batch["t"]]
    x_t = noise(batch["latents"], batch["eps"], abar).float()
    eps_pred, enc = task.model(x_t, batch["t"], task.prompt_ids[batch["subject"]], batch["time_ids"])
    return x_t, eps_pred, enc, x0_estimate(x_t, eps_pred, abar).float()


def test_b_pretrained_branch_ignores_lora_and_placeholders(subject_images, tmp_path):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 700])
    before = task.pretrained(x, t, task.empty_enc, task.clean_enc)
    with torch.no_grad():
        for p in lora:
            p.mul_(3.0).add_(0.1)
        embedding.rows.add_(torch.randn_like(embedding.rows))  # a constant shift would vanish in LayerNorm
    after = task.pretrained(x, t, task.empty_enc, task.clean_enc)
    # and it is the untouched base model: a fresh tiny UNet with no adapter at all
    fresh = load_base("tiny")
    clean = fresh.text_encoder(fresh.family.tokenize(fresh, ["A sketch of cat"], DEVICE))[0]
    with torch.no_grad():
        reference = fresh.denoiser(x, t, clean.expand(2, -1, -1)).sample
    for b, a in zip(before, after):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(after[1], reference, rtol=1e-5, atol=1e-6)
    assert adapters_on(base.denoiser), "the adapter must be re-enabled after the pre-trained call"


def test_c_pretrained_branch_sees_no_placeholder(rig):
    task = rig.task(FAST["batched"])
    for prompt in (task.config.clean_prompt, "", NFSD_NEGATIVE):
        assert (rig.base.family.tokenize(rig.base, [prompt], DEVICE) < rig.embedding.first_id).all()
    assert (task.prompt_ids >= rig.embedding.first_id).any(dim=1).all()  # while each y_P carries its [V]
    batch = make_batch()
    x_t, eps_pred, enc, x0_hat = personalization_forward(rig, task, batch)
    with UNetCalls(rig.base.denoiser) as rec:
        task.alignment_branch(x0_hat, batch, enc)
    with torch.no_grad():
        clean = rig.nets.pre_text_encoder(ids_of(rig.nets.pre_tokenizer, ["A sketch of cat and mug"]))[0]
    pretrained_calls = [c for c in rec.calls if not c["lora"]]
    assert len(pretrained_calls) == 1  # ∅ and y^c batched (FastPaths.batch_pretrained: on by default on CPU)
    torch.testing.assert_close(pretrained_calls[0]["enc"][2:], clean.expand(2, -1, -1))
    assert adapters_on(rig.base.denoiser)


@pytest.mark.parametrize("alignment", ["palp", "sds", "nfsd"])
def test_f_alignment_outputs_have_no_grad_fn(rig, alignment):
    task = rig.task(alignment=alignment)
    batch = make_batch()
    x_t, eps_pred, enc, x0_hat = personalization_forward(rig, task, batch)
    assert x0_hat.grad_fn is not None
    out = task.alignment_branch(x0_hat, batch, enc)
    assert out and all(v.grad_fn is None and not v.requires_grad for v in out.values())


def test_g_only_lora_and_placeholder_rows_change(subject_images, tmp_path):
    task, base, embedding, lora, batch, _ = make_task(subject_images, tmp_path)
    optimizer = make_optimizer(task.config, lora, embedding)
    modules = {"unet": base.denoiser, "text_encoder": base.text_encoder, "vae": base.vae}
    before = {f"{m}.{n}": p.detach().clone() for m, mod in modules.items() for n, p in mod.named_parameters()}
    table_before = embedding.base.weight.detach().clone()
    sum(task.training_step(batch).values()).backward()
    optimizer.step()
    changed = {n for m, mod in modules.items() for n_, p in mod.named_parameters()
               for n in [f"{m}.{n_}"] if not torch.equal(p, before[n])}
    lora_names = {f"unet.{n}" for n, p in base.denoiser.named_parameters() if "lora_" in n}
    assert changed <= lora_names | {"text_encoder.embeddings.token_embedding.rows"}
    assert "text_encoder.embeddings.token_embedding.rows" in changed
    assert any(n.endswith("lora_B.default.weight") for n in changed)
    assert torch.equal(embedding.base.weight, table_before)  # every other row bit-identical


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

