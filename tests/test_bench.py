"""benchmarks/step_bench.py --tiny, in-process: the benchmark runs the trainer's own step end to end."""

import json

import pytest
import torch

from benchmarks import step_bench
from palp_trainer.objective.task import FastPaths


def test_tiny_bench_reports_every_run_and_time_to_adapter(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--batches", "2", "--steps", "1", "--repeats", "1", "--warmup", "0",
            "--variants", "eager", "fast+fold_alignment", "--modes", "lora_ti", "palp", "palp_every2",
            "--train-steps", "2", "--json", str(out)]
    assert step_bench.main(argv) == 0
    report = json.loads(out.read_text())
    runs = {(r["variant"], r["mode"], r["batch"]): r for r in report["runs"]}
    modes = ("lora_ti", "palp", "palp_every2")
    assert set(runs) == {(v, m, b) for v in ("eager", "fast+fold_alignment") for m in modes for b in (2,)}
    for key, r in runs.items():
        assert "error" not in r, key
        assert r["ms_per_step"] > 0 and r["img_per_s"] > 0 and r["tflop_per_step"] > 0
        # the last timed step: step 1 (0-based) has no alignment term at align_every 2
        assert set(r["losses"]) == ({"denoise_loss"} if key[1] != "palp" else {"denoise_loss", "align_loss"})
    for variant in ("eager", "fast+fold_alignment"):
        for b in (2,):  # PALP: 3 extra no-grad UNet calls (pre-trained ∅ and y^c, personalized y_P)
            assert runs[(variant, "palp", b)]["tflop_per_step"] > 1.5 * runs[(variant, "lora_ti", b)]["tflop_per_step"]
        # every 2nd step aligned: the mean of the two step kinds
        half = (runs[(variant, "palp", 2)]["tflop_per_step"] + runs[(variant, "lora_ti", 2)]["tflop_per_step"]) / 2
        assert runs[(variant, "palp_every2", 2)]["tflop_per_step"] == pytest.approx(half, rel=1e-6)
    assert runs[("fast+fold_alignment", "palp", 2)]["fast"]["fold_alignment"]
    tta = report["time_to_adapter"]
    assert "error" not in tta and tta["steps"] == 2 and len(tta["eval_s"]) == 2  # milestones 1 and 2
    assert 0 < tta["eval_fraction"] < 1 and tta["time_to_adapter_s"] > sum(tta["eval_s"])
    assert report["versions"]["torch"] == torch.__version__


def test_variant_names():
    cpu = torch.device("cpu")
    assert step_bench.parse_variant("eager", cpu, torch.float32) == FastPaths()
    assert step_bench.parse_variant("eager+channels_last+fold_alignment", cpu, torch.float32) == FastPaths(
        channels_last=True, fold_alignment=True)
    cuda = torch.device("cuda")
    assert step_bench.parse_variant("fast-cuda_graphs", cuda, torch.bfloat16) == FastPaths(
        native_dtype=True, lora_compute_dtype=True, fold_alignment=True, batch_pretrained=True, channels_last=True)
    assert step_bench.parse_variant("fast", cuda, torch.bfloat16, batch_size=16) == FastPaths(
        native_dtype=True, lora_compute_dtype=True, cuda_graphs=True)
    with pytest.raises(SystemExit, match="unknown knob"):
        step_bench.parse_variant("fast-graphs", cpu, torch.float32)


def test_tiny_pack_bench_times_one_trial_alone_then_two_at_once(tmp_path):
    from benchmarks import pack_bench
    out = tmp_path / "pack.json"
    assert pack_bench.main(["--tiny", "--trials", "2", "--train-steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["alone"]["trials"] == 1 and len(report["alone"]["time_to_adapter_s"]) == 1
    assert report["packed"]["trials"] == 2 and len(report["packed"]["time_to_adapter_s"]) == 2
    assert all(t > 0 for t in report["alone"]["time_to_adapter_s"] + report["packed"]["time_to_adapter_s"])
    # the speed-up is 2 x (one alone) / (two at once), from the measured walls
    assert report["speedup"] == pytest.approx(2 * report["alone"]["wall_s"] / report["packed"]["wall_s"])
