"""train_loop: pinned losses, exact resume, non-finite guard, saved keys."""

import json

import pytest
import torch
from safetensors.torch import load_file

from palp_trainer.export.adapter import read_manifest
from palp_trainer.loops.solo import NonFiniteLoss, train_loop
from tests.conftest import tiny_config


def history(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_first_two_steps_pinned(subject_images, tmp_path):
    train_loop(tiny_config(subject_images, tmp_path / "run"))
    steps = history(tmp_path / "run")
    got = [(m["denoise_loss"], m["align_loss"]) for m in steps]
    # regression pins on the tiny model (seed 0); a change here changes what training does
    want = [(1.1123046, -0.01826453), (1.1060319, -0.01583344)]
    assert [m["step"] for m in steps] == [1, 2]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-6)


def test_saved_adapter_keys(subject_images, tmp_path):
    train_loop(tiny_config(subject_images, tmp_path / "run", steps=1))
    adapter = tmp_path / "run" / "adapter"
    lora = load_file(adapter / "pytorch_lora_weights.safetensors")
    # (down, up) x (q, k, v, out) x 8 attention layers (attn1+attn2 in 4 transformer blocks), diffusers names
    assert len(lora) == 2 * 4 * 8
    assert {k.rsplit(".", 4)[-4] for k in lora} == {"to_q", "to_k", "to_v", "0"}
    assert all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in lora)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight" in lora
    emb = load_file(adapter / "learned_embeds-V1.safetensors")
    assert list(emb) == ["[V1]"] and emb["[V1]"].shape == (32,)
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["placeholders"] == {"[V1]": "cat"} and manifest["steps"] == 1
    assert manifest["embeddings"] == {"[V1]": "learned_embeds-V1.safetensors"}
    # the whole folder: diffusers files, the UIs' files (export_kohya), the references CLIP-I scores against
    assert sorted(p.relative_to(adapter).as_posix() for p in adapter.rglob("*") if p.is_file()) == [
        "embeddings/palp_cat_v1.safetensors", "kohya/palp_cat.safetensors", "learned_embeds-V1.safetensors",
        "manifest.json", "pytorch_lora_weights.safetensors", *(f"references/palp_cat_v1/{n}.png" for n in range(3))]
    kohya = load_file(adapter / manifest["kohya_lora"])
    assert len(kohya) == 3 * 4 * 8  # (down, up, alpha) x (q, k, v, out) x 8 attention layers
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in kohya


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: the GradScaler's scale and growth state resume too
def test_resume_is_exact(subject_images, tmp_path, precision):
    train_loop(tiny_config(subject_images, tmp_path / "straight", steps=4, checkpoint_every=2, precision=precision))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"
    assert "kohya_lora" not in read_manifest(checkpoint)  # an adapter without the UIs' copy of the LoRA
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    if precision == "fp16":  # 2 finite steps: the initial 2**16 scale, growth tracker at 2
        assert state["scaler"]["scale"] == 2.0**16 and state["scaler"]["_growth_tracker"] == 2
    else:
        assert state["scaler"] == {}
    train_loop(tiny_config(subject_images, tmp_path / "first", steps=2, checkpoint_every=2, precision=precision))
    train_loop(tiny_config(subject_images, tmp_path / "resumed", steps=4, precision=precision, checkpoint_every=2,
                           resume_from=str(tmp_path / "first" / "checkpoints" / "step-000002")))
    end = [torch.load(tmp_path / run / "checkpoints" / "step-000004" / "state.pt", weights_only=False)["scaler"]
           for run in ("straight", "resumed")]
    assert end[0] == end[1]  # fp16: growth tracker 4 in both (2 if the resumed run had not loaded the scaler)
    a = load_file(tmp_path / "straight" / "adapter" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(tmp_path / "straight" / "adapter" / "learned_embeds-V1.safetensors")
    eb = load_file(tmp_path / "resumed" / "adapter" / "learned_embeds-V1.safetensors")
    assert torch.equal(ea["[V1]"], eb["[V1]"])
    assert [m["step"] for m in history(tmp_path / "resumed")] == [3, 4]
    assert history(tmp_path / "resumed")[-1]["loss"] == history(tmp_path / "straight")[-1]["loss"]


def test_non_finite_loss_names_step_and_term(subject_images, tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"step \d+: (denoise|align)_loss is (nan|inf)"):
        train_loop(tiny_config(subject_images, tmp_path / "run", steps=6, lr=1e30, embedding_lr=1e30))


def test_align_every_logs_the_alignment_term_on_its_steps_only(subject_images, tmp_path):
    train_loop(tiny_config(subject_images, tmp_path / "run", steps=4, align_every=2))
    rows = history(tmp_path / "run")
    assert ["align_loss" in r for r in rows] == [True, False, True, False]
    assert all(r["loss"] == r["denoise_loss"] + r.get("align_loss", 0.0) for r in rows)


def test_resume_mid_align_cycle_with_grad_accum_is_exact(subject_images, tmp_path):
    """align_every follows the optimizer step, so a run resumed at step 3 of a k = 2 cycle (with 2
    micro-batches a step) aligns where the straight run does."""
    knobs = dict(align_every=2, grad_accum=2, checkpoint_every=3)
    train_loop(tiny_config(subject_images, tmp_path / "straight", steps=4, **knobs))
    train_loop(tiny_config(subject_images, tmp_path / "first", steps=3, **knobs))
    train_loop(tiny_config(subject_images, tmp_path / "resumed", steps=4, **knobs,
                           resume_from=str(tmp_path / "first" / "checkpoints" / "step-000003")))
    a = load_file(tmp_path / "straight" / "adapter" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(tmp_path / "resumed") == [{**r, "train_seconds": h["train_seconds"]} for r, h in
                                             zip(history(tmp_path / "straight")[3:], history(tmp_path / "resumed"))]


def test_restart_into_the_same_folder_writes_each_step_once_and_keeps_the_clock(subject_images, tmp_path):
    """A worker that died after step 3, restarted from its step-2 checkpoint, redoes step 3: written once."""
    run = tmp_path / "run"
    train_loop(tiny_config(subject_images, run, steps=3, checkpoint_every=2))
    saved = torch.load(run / "checkpoints" / "step-000002" / "state.pt", weights_only=True)["seconds"]
    train_loop(tiny_config(subject_images, run, steps=4, checkpoint_every=2,
                           resume_from=str(run / "checkpoints" / "step-000002")))
    rows = history(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert saved > 0 and rows[2]["train_seconds"] > saved  # counted on from the checkpoint, not from zero


class _Planted:
    """A pickle that runs code when loaded: what a tampered checkpoint on shared storage could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoints_load_without_running_pickled_code(subject_images, tmp_path):
    run = tmp_path / "run"
    train_loop(tiny_config(subject_images, run, steps=2, checkpoint_every=2))
    state_file = run / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": _Planted(marker)}, state_file)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        train_loop(tiny_config(subject_images, tmp_path / "resumed", steps=3,
                               resume_from=str(run / "checkpoints" / "step-000002")))
    assert not marker.exists()


def test_out_of_memory_fails_with_what_to_lower(subject_images, tmp_path, monkeypatch):
    from palp_trainer.loops.worker import TrialOutOfMemory
    from palp_trainer.objective.task import PalpTask

    def oom(*args, **kwargs):  # what CUDA raises when an allocation fails
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PalpTask, "training_step", oom)
    with pytest.raises(TrialOutOfMemory) as e:
        train_loop(tiny_config(subject_images, tmp_path / "run", batch_size=2, steps=2))
    message = str(e.value)
    assert "\n" not in message and "at step 1" in message
    assert "batch_size 2" in message and "resolution 32 px" in message and "train.batch_size" in message


def test_runlog_after_a_restart_skips_the_steps_the_run_already_holds(tmp_path):
    """Also after a restart from step 0 (the worker died before its first checkpoint was committed)."""
    from mlflow import MlflowClient

    from palp_trainer.loops.runlog import RunLog

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    first = RunLog(uri, run_id)
    for step in (1, 2, 3):
        first.metrics(step, {"loss": float(step)})
    first.flush()
    again = RunLog(uri, run_id)  # restarted from a step-1 checkpoint: steps 2 and 3 redone
    for step in (2, 3, 4):
        again.metrics(step, {"loss": 10.0 * step, "clip_t": 0.5})
    again.flush()
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert [m.step for m in client.get_metric_history(run_id, "clip_t")] == [2, 3, 4]
