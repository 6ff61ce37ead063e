"""MLflow pyfunc flavor of an exported adapter: `predict(prompts) -> PNG bytes`.

Logged as a model from code (this file, with palp_trainer as code_paths), so nothing is pickled.

    model = mlflow.pyfunc.load_model("models:/palp-cat-a-sketch-of-v1@champion")
    pngs = model.predict(["A sketch of [V1]"], params={"seed": 0, "steps": 25, "guidance_scale": 7.5})

`method` defaults to the version's best sampling method (its model config), else "cfg".
"""

import io
from typing import Any

import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from palp_trainer.config import method_of

DEFAULT_PARAMS = {"seed": 0, "steps": 25, "guidance_scale": 7.5, "method": "cfg", "omega": 0.6}


def sampling_defaults(best_method: str | None) -> dict:
    """DEFAULT_PARAMS with a version's best sampling method: "pg-0.6" -> method "pg", omega 0.6: the signature's
    param defaults (MLflow fills those in) and, as `model_config(...)`, what `load_context` reads."""
    if not best_method:
        return dict(DEFAULT_PARAMS)
    method, options = method_of(best_method)
    return {**DEFAULT_PARAMS, "method": method, **options}


def model_config(defaults: dict) -> dict:
    """The logged model's config: the sampling method. Nested, because MLflow also logs a model's config as
    params of its run, and the run's own `steps` and `seed` are the training's, not sampling's."""
    return {"sampling": {k: defaults[k] for k in ("method", "omega")}}


def signature(defaults: dict = DEFAULT_PARAMS) -> ModelSignature:
    """prompts -> PNG bytes; the sampling knobs as params with `defaults`."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema([ColSpec(DataType.binary)]),
        params=ParamSchema([ParamSpec(k, DataType.string if isinstance(v, str) else
                                      DataType.long if isinstance(v, int) else DataType.double, v)
                            for k, v in defaults.items()]),
    )


class PalpPipelineModel(mlflow.pyfunc.PythonModel):
    """The manifest's base model + the adapter, loaded through the trainer's own path."""

    def load_context(self, context) -> None:
        import torch

        from palp_trainer.sampling.pipeline import pipeline_from
        from palp_trainer.export.adapter import load_adapter
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.base, self.manifest = load_adapter(context.artifacts["adapter"], device)
        self.pipe = pipeline_from(self.base)
        # the version's best method (model_config); older versions have no config: CFG
        self.defaults = {**DEFAULT_PARAMS, **(context.model_config or {}).get("sampling", {})}

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[bytes]:
        from palp_trainer.sampling.pipeline import generate
        p = {**self.defaults, **(params or {})}
        resolution = self.manifest["resolution"]
        if p["method"] == "cfg":
            images = [generate(self.pipe, prompt, (int(p["seed"]),), int(p["steps"]), float(p["guidance_scale"]),
                               1, resolution)[0] for prompt in model_input]
        else:
            from palp_trainer.sampling.guidance import sample
            images = [sample(self.pipe, prompt, p["method"], omega=float(p["omega"]), seeds=(int(p["seed"]),),
                             steps=int(p["steps"]), guidance_scale=float(p["guidance_scale"]), batch_size=1,
                             resolution=resolution, placeholders=self.manifest["placeholders"])[0]
                      for prompt in model_input]
        out = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")  # lossless: the bytes decode to the exact sampled pixels
            out.append(buffer.getvalue())
        return out


mlflow.models.set_model(PalpPipelineModel())
