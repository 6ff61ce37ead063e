"""Trial groups on Ray (resources.trials_per_group > 1): each member is still its own Tune trial and MLflow run;
a coordinator actor gathers members that can share a group and runs one TorchTrainer per group.

A member's Tune trial only waits: it joins, then relays to Tune what the group's rank 0 sends it (a milestone's
metrics, the final ones, or the error that ended it). ASHA decides on each member as on any trial and publishes
its decision where the group's workers read it (worker.scheduler_decision): a stopped member leaves the group at
that milestone, the others train on. The coordinator and its group runners are owned by the driver, so they end
with the sweep; Tune stopping a member's trial ends that trial alone.
"""

import hashlib
import json
import queue
import threading
import time

import ray
import ray.tune
from mlflow import MlflowClient
from ray.train.torch import TorchTrainer

from palp_trainer.config import GROUP_KNOBS, group_key
from palp_trainer.storage import join, read_text, write_text

from .connect import TRIAL_ACTOR
from .recipe import Recipe
from .search_space import grid_points, train_config
from .tracking import Tracking, end_run, fail_run
from .trial import run_config, scaling_config, start_trial

NAMESPACE = "palp-sweep"
LEDGER = "groups.json"  # in the experiment folder: trial id -> its group's Ray Train run name
RESUMED = "resumed:"  # a forming key: the earlier group a resumed member belongs to
WAIT_S = 20.0  # a group forms when full, when all its expected members joined, or this long after the last join
RELAY_POLL_S = 10.0
ON_HEAD = {k: v for k, v in TRIAL_ACTOR.items() if k != "CPU"}  # the coordinator and group runners, like trial actors


class GroupFailed(RuntimeError):
    """The trial's group failed (after Ray Train's restarts), or this member diverged."""


def coordinator_name(recipe: Recipe) -> str:
    return f"groups/{recipe.name}"


def expected_members(recipe: Recipe) -> dict[str, int] | None:
    """How many trials of the sweep share each group key, when the grid decides it (a sampled knob outside
    GROUP_KNOBS makes keys random: then groups form by WAIT_S)."""
    dims = recipe.search.dims
    if any(d.kind not in ("grid", "fixed") and k not in GROUP_KNOBS for k, d in dims.items()):
        return None
    fixed = {k: d.values[0] for k, d in dims.items() if d.kind == "fixed"}
    counts: dict[str, int] = {}
    for pair in recipe.pair_ids():
        for point in grid_points(recipe):
            key = group_key(train_config(recipe, pair, {**point, **fixed}, "-"))
            counts[key] = counts.get(key, 0) + recipe.search.num_samples
    return counts


@ray.remote(max_concurrency=1000)  # threaded: members block in next() while groups report and form
class Coordinator:
    def __init__(self, recipe: Recipe, storage_path: str, expected: dict[str, int] | None, name: str):
        self.recipe, self.storage_path, self.expected, self.name = recipe, storage_path, expected, name
        self.size = recipe.resources.trials_per_group
        # trial id -> the group it trained in, from earlier runs of this sweep (`--resume`): a member that comes
        # back rejoins that group, whose checkpoints hold it (and the members that will not come back)
        self.ledger = join(storage_path, recipe.name, LEDGER)
        self.earlier: dict[str, str] = json.loads(read_text(self.ledger) or "{}")
        self.lock = threading.Lock()
        self.forming: dict[str, list[tuple[str, dict]]] = {}  # key -> [(trial id, TrainConfig dict)]
        self.joined: dict[str, int] = {}
        self.last_join: dict[str, float] = {}
        self.inbox: dict[str, queue.Queue] = {}
        self.running: dict[ray.ObjectRef, list[str]] = {}
        self.spare = self._runner()  # started while the first members join: its imports (torch, Ray Train) are done
        threading.Thread(target=self._watch, daemon=True).start()

    @staticmethod
    def _runner():
        return GroupRunner.options(num_cpus=0, resources=ON_HEAD).remote()

    def join(self, key: str, trial_id: str, config: dict) -> None:
        with self.lock:
            self.inbox.setdefault(trial_id, queue.Queue())
            if trial_id in self.earlier:  # resumed: its group again, by name
                key = RESUMED + self.earlier[trial_id]
                expected = sum(1 for g in self.earlier.values() if RESUMED + g == key)
            else:
                expected = (self.expected or {}).get(key)
            self.forming.setdefault(key, []).append((trial_id, config))
            self.joined[key] = self.joined.get(key, 0) + 1
            self.last_join[key] = time.monotonic()
            if len(self.forming[key]) >= self.size or (expected and self.joined[key] >= expected):
                self._launch(key)

    def send(self, trial_id: str, kind: str, payload) -> None:
        self.inbox.setdefault(trial_id, queue.Queue()).put((kind, payload))

    def next(self, trial_id: str, timeout: float):
        try:
            return self.inbox.setdefault(trial_id, queue.Queue()).get(timeout=timeout)
        except queue.Empty:
            return None

    def _launch(self, key: str) -> None:
        members = sorted(self.forming.pop(key))  # in trial-id order (the grid's): reports reach ASHA in it
        ids = [trial_id for trial_id, _ in members]
        # named by its first members (a resumed sweep finds the group's checkpoints by this name)
        name = key.removeprefix(RESUMED) if key.startswith(RESUMED) else \
            "group-" + hashlib.sha256(" ".join(ids).encode()).hexdigest()[:12]
        self.earlier.update({trial_id: name for trial_id in ids})
        write_text(self.ledger, json.dumps(self.earlier, indent=1))
        runner, self.spare = self.spare, self._runner()
        self.running[runner.fit.remote(self.recipe, self.storage_path, name, ids, [c for _, c in members],
                                       self.name)] = ids

    def _watch(self) -> None:
        """Form the groups that waited long enough; tell the members of a failed group why."""
        while True:
            time.sleep(0.5)
            with self.lock:
                for key in [k for k, m in self.forming.items() if m and time.monotonic() - self.last_join[k] > WAIT_S]:
                    self._launch(key)
                refs = list(self.running)
            if not refs:
                continue
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                ids = self.running.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001: whatever ended the group ends its members, named
                    for trial_id in ids:
                        self.send(trial_id, "error", f"its trial group failed: {' '.join(str(e).split())[-500:]}")


@ray.remote
class GroupRunner:
    """Runs one group's TorchTrainer (an actor of its own, so that Tune stopping a member does not end it)."""

    def fit(self, recipe: Recipe, storage_path: str, name: str, trial_ids: list[str], configs: list[dict],
            coordinator: str):
        trainer = TorchTrainer(
            train_group_worker,
            train_loop_config={"members": configs, "trial_ids": trial_ids, "coordinator": coordinator},
            scaling_config=scaling_config(recipe),
            run_config=run_config(recipe, storage_path, name),  # a resumed sweep's members find its checkpoints
        )
        trainer.fit()


def train_group_worker(config: dict) -> None:
    """Each worker of a group's TorchTrainer: the group loop, with rank 0's messages to the members' trials."""
    from palp_trainer.loops.group import train_group

    coordinator = ray.get_actor(config["coordinator"], namespace=NAMESPACE)

    def send(trial_id: str, kind: str, payload) -> None:
        ray.get(coordinator.send.remote(trial_id, kind, payload))  # in order: each arrives before the next

    train_group(config["members"], config["trial_ids"], send)


def run_member(params: dict, recipe: Recipe, storage_path: str, tracking: Tracking) -> None:
    """Tune function trainable of a group member: join, then relay the group's messages for this trial."""
    trial_id, config, run_id = start_trial(params, recipe, storage_path, tracking)
    coordinator = ray.get_actor(coordinator_name(recipe), namespace=NAMESPACE)
    ray.get(coordinator.join.remote(group_key(config), trial_id, config.to_dict()))
    while True:
        message = ray.get(coordinator.next.remote(trial_id, RELAY_POLL_S))
        if message is None:
            continue
        kind, payload = message
        if kind == "error":
            fail_run(MlflowClient(tracking.uri), run_id, payload)
            raise GroupFailed(payload)
        ray.tune.report(payload)
        if kind == "done":
            end_run(MlflowClient(tracking.uri), run_id, "FINISHED")
            return


def start_coordinator(recipe: Recipe, storage_path: str):
    """The sweep's coordinator, owned by the driver (it and its groups end with the sweep)."""
    name = coordinator_name(recipe)
    return Coordinator.options(name=name, namespace=NAMESPACE, num_cpus=0,
                               resources=ON_HEAD).remote(
        recipe, storage_path, expected_members(recipe), name)
