"""What a person reads in MLflow, without a sweep: run names, trial labels, markdown escaping, the parent run's
description and table, the version's description and tags, the browse line, image sizes, the pyfunc's
defaults. tests/test_sweep_mlflow.py checks the same things on a real sweep through MLflow's API."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from orchestrator import model_card, overview
from orchestrator.labels import md_escape, md_plain, run_name, short_id, trial_label
from orchestrator.recipe import Prompt, Subject
from orchestrator.recipe_yaml import load_recipe
from orchestrator.tracking import VIEW_TAG, Tracking, browse_lines, end_run, runs_view, source_tags
from palp_trainer.export.pyfunc_model import DEFAULT_PARAMS, model_config, sampling_defaults, signature
from palp_trainer.loops.runlog import RunLog, upscaled

SMOKE = str(Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml")


def test_trial_label_names_the_arm_and_the_searched_values():
    assert trial_label("palp", {"alpha": 7.5, "beta": 0.5, "rank": 4, "alignment": "palp"}) == "palp α7.5 β0.5 r4"
    # the baseline has no alignment term: α, β, λ mean nothing there
    assert trial_label("none", {"alpha": 7.5, "rank": 8, "align_weight": 0.3}) == "baseline r8"
    assert trial_label("palp", {"lr": 1e-4, "align_weight": 0.3}) == "palp lr=1e-4 λ0.3"
    assert trial_label("sds", {}) == "sds"


def test_run_name_starts_with_the_trial_id_and_stays_short():
    assert short_id("12894_00001") == "00001" and short_id("abc") == "abc"
    name = run_name("cat__a-sketch-of-v1", "12894_00001", "palp α7.5 r4")
    assert name == "00001 · palp α7.5 r4 · cat/a-sketch-of-v1"
    long = run_name("cat+mug+dog__" + "a-very-long-prompt-slug-" * 3, "12894_00017", "palp α7.5 β0.5 r4")
    assert len(long) == 60 and long.startswith("00017 · palp α7.5 β0.5 r4 · cat+mug+dog/") and long.endswith("…")


def test_md_escape_renders_literally():
    markdown_it = pytest.importorskip("markdown_it")
    text = "[V1] (cat) *bold* _it_ `code` <b>x</b> a|b #1 !img ~strike \\ back"
    escaped = md_escape(text)
    assert escaped.startswith(r"\[V1\] \(cat\) \*bold\* \_it\_ \`code\`")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(escaped)
    for tag in ("<a", "<em", "<strong", "<code", "<b>"):
        assert tag not in html
    assert "[V1] (cat) *bold* _it_ `code` &lt;b&gt;x&lt;/b&gt; a|b #1 !img ~strike \\ back" in html
    unescaped = markdown_it.MarkdownIt("commonmark").render("[V1] (cat) *bold*")
    assert "<em>" in unescaped  # what the escaping prevents


def test_upscaled_grid_is_at_least_512_px_with_crisp_pixels():
    grid = Image.new("RGB", (96, 64), "white")
    grid.putpixel((0, 0), (255, 0, 0))
    big = upscaled(grid)
    assert big.size == (576, 384)  # factor 6: the smallest whole factor reaching 512
    assert big.getpixel((5, 5)) == (255, 0, 0) and big.getpixel((6, 6)) == (255, 255, 255)  # nearest: a 6x6 block
    wide = Image.new("RGB", (800, 10))
    assert upscaled(wide) is wide


def test_runlog_samples_logs_an_image_with_its_step_and_a_big_artifact(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    Image.new("RGB", (96, 96), "yellow").save(tmp_path / "step-000100.png")
    log = RunLog(uri, run_id)
    log.samples(tmp_path / "step-000100.png", "samples", 100)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any(p.startswith("images/samples+step+100+") and p.endswith(".png") for p in images)
    local = client.download_artifacts(run_id, "samples/step-000100.png", str(tmp_path / "dl"))
    assert Image.open(local).size == (576, 576)
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"
    # the run's description (its Overview page) shows the latest milestone grid, by the artifact's UI link
    note = client.get_run(run_id).data.tags["mlflow.note.content"]
    assert f"(get-artifact?path=samples%2Fstep-000100.png&run_uuid={run_id})" in note and "step 100" in note
    # why the run ended goes above the samples; a later reason replaces an earlier one (a stop after a lost actor)
    end_run(client, run_id, "FINISHED", note="failed: the actor died")
    end_run(client, run_id, "FINISHED", note="stopped by ASHA at step 100")
    assert client.get_run(run_id).data.tags["mlflow.note.content"] == "stopped by ASHA at step 100\n\n" + note


def test_sampling_defaults_follow_the_best_method():
    assert sampling_defaults("pg-0.4") == {**DEFAULT_PARAMS, "method": "pg", "omega": 0.4}
    assert sampling_defaults("alignit")["method"] == "alignit" and sampling_defaults(None) == DEFAULT_PARAMS
    params = {p.name: p.default for p in signature(sampling_defaults("pg-0.4")).params.params}
    assert params["method"] == "pg" and params["omega"] == 0.4 and params["steps"] == 25
    assert model_config(sampling_defaults("pg-0.4")) == {"sampling": {"method": "pg", "omega": 0.4}}


SUBJECT = Subject("cat", "[V1]", "cat", ("a.png",), "A photo of [V1]")
PROMPT = Prompt("A sketch of [V1] (cat) in *ink*", "A sketch of cat in *ink*")
BEST = {"trial_id": "12894_00001", "alignment": "palp", "hparams": {"alignment": "palp", "rank": 4}, "label": "palp r4",
        "step": 8, "clip_t": 0.31, "clip_i": 0.72, "composite": 0.47, "best_method": "pg-0.6",
        "methods": {"cfg": {"clip_t": 0.3, "clip_i": 0.7, "composite": 0.46},
                    "pg-0.6": {"clip_t": 0.31, "clip_i": 0.72, "composite": 0.47}}}


def test_version_description_escapes_the_prompts_and_embeds_the_best_methods_samples():
    text = model_card.version_description(
        pair="cat__a-sketch", subjects=(SUBJECT,), prompt=PROMPT, best=BEST, trials=4, recipe_name="smoke_x",
        base_model="tiny", experiment_id="3", run_id="r1", score_names=("clip_t", "clip_i", "composite"),
        described={"clip_t": "clip_t (text alignment)"})
    assert r"A sketch of \[V1\] \(cat\) in \*ink\*" in text and "[V1] (cat)" not in text
    assert r"- \[V1\] (cat): subject cat" in text and r"smoke\_x" in text
    assert "![samples with pg-0.6](get-artifact?path=samples%2Fstep-000008-pg-0.6.png&run_uuid=r1)" in text
    assert "| **pg-0.6** | **0.3100** | **0.7200** | **0.4700** |" in text and "| cfg | 0.3000 |" in text
    assert text.startswith("Trial 00001 (palp r4), the best of 4 in sweep smoke\\_x: composite 0.4700 after 8 steps.")
    assert "(#/experiments/3/runs/r1?workflowType=machine_learning)" in text
    assert "00001 · palp r4 · cat/a-sketch" in text
    assert model_card.samples_artifact({**BEST, "best_method": "cfg"}) == "samples/step-000008.png"
    model = model_card.model_description(subjects=(SUBJECT,), prompt=PROMPT, base_model="tiny", name="palp-cat",
                                         champion="3", best=BEST, run_id="r1")
    assert "**@champion: [version 3](#/models/palp-cat/versions/3)**, trial 00001 (palp r4): composite 0.4700" in model
    assert "](get-artifact?path=samples%2Fstep-000008-pg-0.6.png&run_uuid=r1)" in model
    assert r"“A sketch of \[V1\] \(cat\) in \*ink\*”" in model


def test_version_tags_are_few_scores_first_and_the_baseline_has_no_alpha():
    manifest = {"alignment": "palp", "alpha": 7.5, "beta": 1.0, "rank": 4, "steps": 8, "base_model": "tiny"}
    tags = model_card.version_tags(BEST, manifest, ("clip_t", "clip_i", "composite"), "composite", "e1", "smoke")
    assert list(tags) == ["metric.clip_t", "metric.clip_i", "metric.composite", "best_method", "alignment", "alpha",
                          "beta", "rank", "steps", "base_model", "recipe", "eval_hash"]
    assert tags["alpha"] == "7.5" and tags["eval_hash"] == "e1" and tags["metric.composite"] == "0.47"
    baseline = model_card.version_tags({**BEST, "hparams": {"alignment": "none"}}, {**manifest, "alignment": "none"},
                                       ("clip_t", "clip_i", "composite"), "composite", "e1", "smoke")
    assert "alpha" not in baseline and "beta" not in baseline and baseline["alignment"] == "none"


def summary_of(recipe):
    stopped = {**BEST, "trial_id": "12894_00000", "alignment": "none", "hparams": {"alignment": "none"},
               "label": "baseline", "step": 4, "methods": {}, "error": None, "best_method": None}
    best = {**BEST, "error": None}
    return {"cat__a-sketch-of-v1": {"best": best, "trials": [best, stopped], "plots": {}},
            "dog__a-sketch-of-v2": {"best": None, "trials": [], "plots": {}}}


def test_parent_run_description_winners_and_table():
    recipe = load_recipe(SMOKE)
    summary = summary_of(recipe)
    note = overview.sweep_note(recipe, summary, {"cat__a-sketch-of-v1": {"name": "palp-cat", "version": "2"}},
                               ["dog__a-sketch-of-v2: no trial ran"], {"12894_00001": "r1"}, "3")
    assert r"**smoke**" in note and r"alpha 7.5 × alignment \[palp, none\]" in note
    assert "ASHA (reduction factor 2, from milestone 1) stopped 1 of 2 trial(s) early" in note
    assert note.startswith("**smoke**: 2 trial(s) over 2 (subject, prompt) pair(s); each pair's winner:")
    assert "[00001 · palp r4](#/experiments/3/runs/r1?workflowType=machine_learning)" in note
    assert "[palp-cat v2](#/models/palp-cat/versions/2)" in note
    assert r"cat\_\_a-sketch-of-v1" in note and "**Pairs with no finished trial:**" in note
    registered = {"cat__a-sketch-of-v1": {"name": "palp-cat", "version": "2"}}
    metrics, tags = overview.winner_fields(recipe, summary, registered)
    assert metrics == {"best.cat__a-sketch-of-v1.clip_t": 0.31, "best.cat__a-sketch-of-v1.clip_i": 0.72,
                       "best.cat__a-sketch-of-v1.composite": 0.47, "best.cat__a-sketch-of-v1.step": 8}
    assert tags["best.cat__a-sketch-of-v1.trial"] == "12894_00001" and tags["best.cat__a-sketch-of-v1.rank"] == "4"
    assert tags["best.cat__a-sketch-of-v1.model"] == "models:/palp-cat/2"
    assert overview.key_part("cat+mug__x y") == "cat_mug__x y"
    table = overview.trials_table(recipe, summary)
    # the finished trial once per sampling method, the stopped one once (CFG at its step)
    assert table["method"] == ["cfg", "pg-0.6", "cfg"] and table["step"] == [8, 8, 4]
    assert table["run"] == ["00001 · palp r4 · cat/a-sketch-of-v1"] * 2 + ["00000 · baseline · cat/a-sketch-of-v1"]
    assert table["status"] == ["finished", "finished", "stopped early"] and table["registered"] == [True, True, False]
    assert table["composite"] == [0.46, 0.47, 0.47]


def test_browse_line_opens_the_runs_view():
    [line] = browse_lines("http://u:secret@host:5000/", "7")
    assert line == ("http://u:***@host:5000/#/experiments/7/runs?workflowType=machine_learning"
                    "&viewStateShareKey=palp-sweep")
    command, url = browse_lines("sqlite:////tmp/x/mlflow.db", "7")
    assert command == "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db --port 5000"
    assert url == "then open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" \
                  "&viewStateShareKey=palp-sweep"


def test_runs_view_shows_scores_and_searched_knobs_best_first():
    view = runs_view(load_recipe(SMOKE))
    assert view["selectedColumns"] == ["attributes.`Models`", "metrics.`clip_t`", "metrics.`clip_i`",
                                       "metrics.`composite`", "params.`alpha`", "params.`alignment`",
                                       "tags.`palp.stopped_early_at`"]
    assert view["orderByKey"] == "metrics.`composite`" and view["orderByAsc"] is False
    json.dumps(view)  # an experiment tag


def test_child_runs_carry_mlflows_source_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("x")
    sources = source_tags("recipes/smoke.yaml", "0123abc")
    assert sources["mlflow.source.git.commit"] == "0123abc" and sources["mlflow.source.type"] == "LOCAL"
    assert sources["mlflow.source.name"] == "palp-sweep recipes/smoke.yaml" and sources["mlflow.user"]
    assert "mlflow.source.git.commit" not in source_tags(None, "unknown")
    tracking = Tracking(uri, experiment, client.create_run(experiment).info.run_id, (), tuple(sources.items()))
    run = client.get_run(tracking.child_run("cat__a-sketch", "abc_00002", {"rank": 4}, "baseline r4"))
    assert run.info.run_name == "00002 · baseline r4 · cat/a-sketch"
    assert {k: run.data.tags[k] for k in sources} == sources
    assert VIEW_TAG == "mlflow.sharedViewState.palp-sweep"


def test_curves_plot_the_milestones_the_run_holds():
    import pandas as pd

    from orchestrator.sweep import milestone_history
    # Tune's reports: a checkpoint at step 6 repeats step 4's scores; a trial resumed after its last step
    # reports step 8 again
    df = pd.DataFrame({"step": [2, 4, 6, 8, 8], "composite": [float("nan"), 0.4, 0.4, 0.5, 0.5],
                       "clip_t": [float("nan"), 0.3, 0.3, 0.35, 0.35]})
    assert milestone_history(df, (4, 8), ("composite", "clip_t")) == [
        {"step": 4.0, "composite": 0.4, "clip_t": 0.3}, {"step": 8.0, "composite": 0.5, "clip_t": 0.35}]
    assert milestone_history(None, (4, 8), ("composite",)) == []


@pytest.mark.parametrize("text", ["A sketch of [V1] (cat)", "a *b* _c_ `d` | e # f", r"back\slash [V2]"])
def test_md_plain_undoes_md_escape(text):
    assert md_plain(md_escape(text)) == text


def test_md_plain_reads_a_model_card_as_text():
    card = ("**PALP adapter**: cat as \\[V1\\]\n\n| method | score \\(clip\\) |\n|---|---|\n| **cfg** | 0.5 |\n\n"
            "![samples with cfg](get-artifact?path=x.png)\n- source run: [00001 · palp](#/experiments/1/runs/abc)")
    assert md_plain(card).splitlines() == [
        "PALP adapter: cat as [V1]", "", "method  score (clip)", "cfg  0.5", "",
        "(image: samples with cfg, in the MLflow UI)", "- source run: 00001 · palp"]
