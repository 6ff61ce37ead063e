"""Rank 0's writes to the trial's MLflow run. The run itself is created by the orchestrator."""

import math
import sys
import time
from pathlib import Path
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from PIL import Image

SAMPLES_NOTE = "**Samples at step"  # how a run's description shows its samples begins (RunLog.samples, tracking.end_run)
MIN_WIDTH = 512  # px: a 32 px model's 3x3 grid (96 px) is a speck in the MLflow UI


def upscaled(image: Image.Image, min_width: int = MIN_WIDTH) -> Image.Image:
    """`image` enlarged by the smallest whole factor that makes it >= min_width wide, nearest-neighbour (each
    pixel a crisp block: the samples as sampled, only bigger); as it is when wide enough."""
    factor = math.ceil(min_width / image.width)
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


class RunLog:
    """Buffered metric writes (one batch per flush, not one call per step) plus artifacts.

    A restarted trial (from a checkpoint, or from step 0 when it died before its first checkpoint was
    committed) redoes steps its run may already hold: a (metric, step) already in the run is not logged again. A flush that cannot reach the tracking server
    keeps its metrics for the next one; the final flush raises, so nothing is lost without a failed trial."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 50):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Metric] = []
        self.logged: dict[str, int] = {}  # metric -> last step the run already holds
        for key in self.client.get_run(run_id).data.metrics:  # none for a new run
            self.logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))

    def metrics(self, step: int, values: dict) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)
                         and step > self.logged.get(k, 0)]
        if len(self.pending) >= self.flush_every:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000])  # MLflow's per-batch limit
                self.pending = self.pending[1000:]
        except (MlflowException, OSError) as e:
            if final:
                raise
            print(f"palp: MLflow unreachable, {len(self.pending)} metric values kept for the next flush: "
                  f"{str(e).splitlines()[0]}", file=sys.stderr)

    def holds(self, step: int, key: str) -> bool:
        """Whether the run held `key` at `step` before this process started (a restart redoes such steps)."""
        return step <= self.logged.get(key, 0)

    def samples(self, path, key: str, step: int) -> None:
        """A sample grid, upscaled: as an MLflow image under `key` at `step` (the run page's image cards, with
        a step slider) and as the artifact samples/<file name>. The milestone grid ("samples") also becomes the
        run's description, so the run's Overview, the page a click on the run opens, shows its latest samples."""
        with Image.open(path) as grid:
            image = upscaled(grid.convert("RGB"))
        artifact = f"samples/{Path(path).name}"
        self.client.log_image(self.run_id, image, key=key, step=step)
        self.client.log_image(self.run_id, image, artifact_file=artifact)
        if key == "samples":
            # relative to the UI's address, as orchestrator/model_card.py links artifacts (the /get-artifact endpoint)
            link = f"get-artifact?path={quote(artifact, safe='')}&run_uuid={self.run_id}"
            self.client.set_tag(self.run_id, "mlflow.note.content",
                                f"{SAMPLES_NOTE} {step}** (CFG, the evaluation seeds)\n\n![samples at step {step}]({link})")

    def artifact(self, path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def artifacts(self, directory, folder: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), folder)
