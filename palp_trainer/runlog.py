"""Rank 0's writes to the trial's MLflow run. The run itself is created by the orchestrator."""

import time

from mlflow import MlflowClient
from mlflow.entities import Metric


class RunLog:
    """Buffered metric writes (one batch per flush, not one call per step) plus artifacts."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 50):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Metric] = []

    def metrics(self, step: int, values: dict) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []

    def artifact(self, path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def artifacts(self, directory, folder: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), folder)
