"""Trial groups: a member trains exactly as its trial alone (palp_trainer/objective/group.py)."""

import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler

from palp_trainer.config import TrainConfig, group_key
from palp_trainer.data import SubjectLatents
from palp_trainer.families.base import build
from palp_trainer.families.tiny import SD1_SCHEDULER
from palp_trainer.loops.group import load_group_checkpoint, restore, save_group_checkpoint
from palp_trainer.loops.solo import make_optimizer, train_step
from palp_trainer.objective.group import GroupModel, GroupTask, group_step, make_group_optimizer, member_configs
from palp_trainer.objective.task import FastPaths, PalpModel, PalpTask
from tests.conftest import tiny_config
from tests.numerics import ALIGN_TOL, AlignScale

CPU = torch.device("cpu")
# α, β, λ, lr, embedding lr: every knob a member may have of its own, each member different
KNOBS = [dict(alpha=7.5, beta=1.0, align_weight=1.0, lr=1e-3, embedding_lr=5e-3),
         dict(alpha=3.0, beta=2.0, align_weight=0.5, lr=3e-3, embedding_lr=1e-3),
         dict(alpha=12.0, beta=0.5, align_weight=2.0, lr=5e-4, embedding_lr=2e-2)]
STEPS = 3


def same_weights(weights, solo, config) -> None:
    """After STEPS AdamW steps: within 1% of the most AdamW can move a weight in them (lr per step). Adam divides
    by √v, so a near-zero gradient's last bits (summed in another order) move its update most; a member given
    another's lr, rows or gradient is off by its whole update."""
    for i, (w, s) in enumerate(zip(weights, solo)):
        lr = config.embedding_lr if i == len(weights) - 1 else config.lr
        assert (w - s).abs().max() <= 0.01 * lr * STEPS, (i, (w - s).abs().max(), lr)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to `rel` of b's largest magnitude (fp32 sums in another order; a wrong row or knob is off by O(1))."""
    assert a.shape == b.shape
    assert (a - b).abs().max() <= rel * b.abs().max() + 1e-12, ((a - b).abs().max(), b.abs().max())


def v_model(base):
    """The tiny base read as a v-prediction model (its scheduler says so, as SD-2.x 768's does)."""
    base.noise_scheduler = DDPMScheduler(**{**SD1_SCHEDULER, "prediction_type": "v_prediction"})


def alone(config, prediction="epsilon"):
    """`config` trained alone for STEPS steps with loop.train_step: per-step losses, first-step grads, weights."""
    torch.manual_seed(config.seed)
    base, embedding, lora = build(config, CPU)
    if prediction == "v_prediction":
        v_model(base)
    data = SubjectLatents(base.vae, [s.images for s in config.subjects], 32, config.flip, False, CPU, torch.float32)
    task = PalpTask(config, base, PalpModel(base), embedding.first_id, CPU, torch.float32,
                    FastPaths())
    optimizer = make_optimizer(config, lora, embedding)
    grads, original = [], optimizer.step
    optimizer.step = lambda: (grads or grads.extend(p.grad.clone() for p in [*lora, embedding.rows]), original())[1]
    generator = torch.Generator().manual_seed(config.seed)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    logs = [train_step(task, data, optimizer, scaler, generator, config.batch_size, step=s) for s in range(STEPS)]
    return logs, grads, [p.detach().clone() for p in [*lora, embedding.rows]]


def setup_group(configs, prediction="epsilon"):
    """group_loop.train_group's objects for `configs`: (task, model, optimizer, data, generator)."""
    configs = member_configs(configs)
    config = configs[0]
    torch.manual_seed(config.seed)
    base, embedding, lora = build(config, CPU)
    if prediction == "v_prediction":
        v_model(base)
    for p in [*lora, embedding.rows]:
        p.requires_grad_(False)
    data = SubjectLatents(base.vae, [s.images for s in config.subjects], 32, config.flip, False, CPU, torch.float32)
    model = GroupModel(base, embedding, len(configs))
    task = GroupTask(configs, base, model, embedding.first_id, CPU, torch.float32)
    return task, model, make_group_optimizer(configs, model.members), data, torch.Generator().manual_seed(config.seed)


def grouped(configs, drop_after: dict[int, int] | None = None, prediction="epsilon"):
    """The same trials as one group; drop_after {member: step}: the member stops after that step."""
    task, model, optimizer, data, generator = setup_group(configs, prediction)
    config = task.config
    grads, original = [], optimizer.step
    params = [[*model.members.params_of(m)[0], model.members.params_of(m)[1]] for m in range(len(configs))]
    optimizer.step = lambda: (grads or grads.extend([p.grad.clone() for p in ps] for ps in params), original())[1]
    logs = {m: [] for m in range(len(configs))}
    for s in range(STEPS):
        if not task.active:
            break
        for m, log in group_step(task, data, optimizer, generator, config.batch_size, step=s).items():
            logs[m].append(log)
        task.active = [m for m in task.active if (drop_after or {}).get(m, STEPS) > s + 1]
    weights = [[p.detach().clone() for p in ps] for ps in params]
    return logs, grads, weights, model


@pytest.mark.parametrize("alignment, prediction, base_model", [
    ("palp", "epsilon", "tiny"), ("none", "epsilon", "tiny"), ("nfsd", "epsilon", "tiny"),
    ("palp", "v_prediction", "tiny"), ("palp", "epsilon", "tiny_xl")])
def test_members_train_as_their_trials_alone(subject_images, tmp_path, alignment, prediction, base_model):
    """Per member and step, the losses; the first step's gradients; the weights after 3 AdamW steps: equal to the
    trial alone within fp32 reduction order (the denoising loss to 1e-5 of itself, the alignment term to ALIGN_TOL
    of the magnitudes it is computed from, tests/numerics.py; gradients to 1e-4 of the largest entry; weights: see
    same_weights): the group's batched UNet calls and bmm LoRA add in another order. Members differ in α, β, λ, lr
    and embedding lr, so a member reading another's knob, rows or LoRA fails it (scripts/hand_mutations.py)."""
    configs = [tiny_config(subject_images, tmp_path / str(i), alignment=alignment, steps=STEPS, base_model=base_model,
                           **k) for i, k in enumerate(KNOBS)]
    logs, grads, weights, _ = grouped(configs, prediction=prediction)
    for m, config in enumerate(configs):
        with AlignScale() as spy:
            solo_logs, solo_grads, solo_weights = alone(config, prediction)
        align_scales = iter(config.align_weight * config.align_every * s for s in spy.scales)
        assert [sorted(log) for log in logs[m]] == [sorted(log) for log in solo_logs]
        for group_log, solo_log in zip(logs[m], solo_logs):
            assert group_log["denoise_loss"] == pytest.approx(solo_log["denoise_loss"], rel=1e-5), m
            if "align_loss" in solo_log:
                scale = next(align_scales)
                assert abs(group_log["align_loss"] - solo_log["align_loss"]) <= ALIGN_TOL * scale, \
                    (m, group_log["align_loss"], solo_log["align_loss"], scale)
        for g, s in zip(grads[m], solo_grads):
            close(g, s, rel=1e-4)
        same_weights(weights[m], solo_weights, config)
    moved = [(w - weights[0][i]).abs().max() for i, w in enumerate(weights[1])]
    assert max(moved) > 1e-4  # the members did train apart (a shared update would also pass the above for m=0)


def test_a_stopped_member_stops_alone(subject_images, tmp_path):
    """Member 1 leaves after step 1: its weights stay where step 1 left them; the others go on unchanged."""
    configs = [tiny_config(subject_images, tmp_path / str(i), steps=STEPS, **k) for i, k in enumerate(KNOBS)]
    logs, _, weights, _ = grouped(configs, drop_after={1: 1})
    assert [len(logs[m]) for m in range(3)] == [STEPS, 1, STEPS]
    _, _, after_one, _ = grouped(configs[1:2], drop_after={0: 1})
    same_weights(weights[1], after_one[0], configs[1])
    for m in (0, 2):
        _, _, solo_weights = alone(configs[m])
        same_weights(weights[m], solo_weights, configs[m])


def test_load_member_puts_its_weights_where_evaluation_and_export_read(subject_images, tmp_path):
    configs = [tiny_config(subject_images, tmp_path / str(i), steps=STEPS, **k) for i, k in enumerate(KNOBS[:2])]
    _, _, weights, model = grouped(configs)
    for m in (1, 0):
        model.load_member(m)
        peft = [layer.lora_A["default"].weight for layer in model.layers] + \
               [layer.lora_B["default"].weight for layer in model.layers]
        peft = [p for ab in zip(peft[:len(model.layers)], peft[len(model.layers):]) for p in ab]
        torch.testing.assert_close(torch.cat([p.flatten() for p in peft]),
                                   torch.cat([w.flatten() for w in weights[m][:-1]]))
        torch.testing.assert_close(model.embedding.rows, weights[m][-1])


def test_groups_hold_only_members_that_differ_in_group_knobs(subject_images, tmp_path):
    a = tiny_config(subject_images, tmp_path / "a")
    assert group_key(a) == group_key(replace(a, alpha=3.0, lr=1e-3, output_dir="elsewhere", mlflow_run_id="r"))
    assert group_key(a) != group_key(replace(a, rank=8))
    with pytest.raises(ValueError, match="may differ only in"):
        member_configs([a, replace(a, rank=8)])
    with pytest.raises(ValueError, match="fp16"):
        member_configs([replace(a, precision="fp16")])


def test_a_group_checkpoint_restores_every_member(subject_images, tmp_path):
    """2 steps, checkpoint (member 1 already left), 1 more step; against fresh objects restored from the checkpoint
    taking that step: the same losses for the members still in, and member 1 stays out."""
    configs = [tiny_config(subject_images, tmp_path / str(i), steps=STEPS, **k) for i, k in enumerate(KNOBS)]
    task, model, optimizer, data, generator = setup_group(configs)
    for s in range(2):
        group_step(task, data, optimizer, generator, 2, step=s)
        task.active = [0, 2]
    save_group_checkpoint(tmp_path, 2, model, task.active, optimizer, generator, [c.to_dict() for c in configs],
                          ["a", "b", "c"])
    expected = group_step(task, data, optimizer, generator, 2, step=2)

    task, model, optimizer, data, generator = setup_group(configs)
    state = load_group_checkpoint(tmp_path)
    step, task.active = restore(state, model, optimizer, generator)
    assert (step, task.active, state["trial_ids"]) == (2, [0, 2], ["a", "b", "c"])
    assert [TrainConfig.from_dict(c) for c in state["configs"]] == configs
    assert group_step(task, data, optimizer, generator, 2, step=2) == expected


def test_a_diverging_member_leaves_the_others_untouched(subject_images, tmp_path):
    """Member 1's lr is inf: its weights go non-finite at step 1 and its losses from step 2 on. It is left out of
    the backward (group_step), so members 0 and 2 train exactly as alone."""
    knobs = [KNOBS[0], {**KNOBS[1], "lr": float("inf")}, KNOBS[2]]
    configs = [tiny_config(subject_images, tmp_path / str(i), steps=STEPS, **k) for i, k in enumerate(knobs)]
    logs, _, weights, _ = grouped(configs)
    assert all(math.isfinite(v) for v in logs[1][0].values())
    assert not any(math.isfinite(v) for log in logs[1][1:] for v in log.values())
    for m in (0, 2):
        solo_logs, _, solo_weights = alone(configs[m])
        assert [log["denoise_loss"] for log in logs[m]] == pytest.approx([log["denoise_loss"] for log in solo_logs],
                                                                         rel=1e-5)
        same_weights(weights[m], solo_weights, configs[m])
