"""The training loops: one trial (solo) and a trial group (group), both on worker.py's per-trial plumbing;
runlog (a trial's MLflow run) and stopwatch (its phase times)."""
