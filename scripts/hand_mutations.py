"""Apply each hand-written mutation to a scratch copy, run the tests it must fail, report.

    python scripts/hand_mutations.py [pytest args...]   (default: each mutation's own tests)

The mutations are the bugs that once passed the suite, and the group step's ways of mixing members up
(docs/mutation.md); each must now fail a test. The working tree is never touched: every mutant runs in its own
copy under a temporary folder.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOSSES, TASK, GROUP = (f"palp_trainer/objective/{m}.py" for m in ("losses", "task", "group"))
OBJECTIVE, GROUP_TESTS = "tests/test_objective.py", "tests/test_group.py"

# (name, file, original text, mutated text, the tests that must fail): the original must occur exactly once
MUTATIONS = [
    ("alignment term's sign flipped", TASK,
     "terms += (weight * losses.score_distillation(", "terms += (-weight * losses.score_distillation(", OBJECTIVE),
    ("add_noise's two coefficients swapped", LOSSES,
     "return a.sqrt() * x0 + (1 - a).sqrt() * eps", "return (1 - a).sqrt() * x0 + a.sqrt() * eps", OBJECTIVE),
    ("denoising loss summed, not averaged", LOSSES,
     "F.mse_loss(eps_pred.float(), eps.float())", "F.mse_loss(eps_pred.float(), eps.float(), reduction=\"sum\")",
     OBJECTIVE),
    ("x̂_0 computed from 0.5·ε̂", TASK,
     "losses.predict_x0(x_t, eps_hat, alpha_bar)", "losses.predict_x0(x_t, 0.5 * eps_hat, alpha_bar)", OBJECTIVE),
    ("λ (align_weight) ignored", TASK,
     "weight = cfg.align_weight * cfg.align_every", "weight = cfg.align_every", OBJECTIVE),
    ("align_t_range mask dropped", TASK,
     "weight = weight * ((t >= cfg.align_t_range[0]) & (t < cfg.align_t_range[1]))", "pass", OBJECTIVE),
    ("denoising loss targets the alignment noise (same_noise off)", TASK,
     "if self.v_prediction else eps\n", "if self.v_prediction else eps_align\n", OBJECTIVE),
    # the group step (palp_trainer/objective/group.py): a member must see only its own knobs, rows and LoRA
    ("group: every member reads the first member's α and β", GROUP,
     "getattr(self.configs[m], knob) for m in self.active]", "getattr(self.configs[self.active[0]], knob) for m in "
     "self.active]", GROUP_TESTS),
    ("group: every member at the first member's λ", GROUP,
     "self.configs[m].align_weight * cfg.align_every", "cfg.align_weight * cfg.align_every", GROUP_TESTS),
    ("group: every member reads the first member's placeholder rows", GROUP,
     "offset = (blocks * self.n_tokens)", "offset = (blocks * 0)", GROUP_TESTS),
    ("group: every block gets the first routed member's LoRA A", GROUP,
     "a = torch.stack([self.members.A[self.route[i]][j] for i in on])",
     "a = torch.stack([self.members.A[self.route[on[0]]][j] for i in on])", GROUP_TESTS),
    ("group: per-row knobs repeated, not interleaved", GROUP,
     "for m in self.active],\n                            device=self.device).repeat_interleave(b)",
     "for m in self.active],\n                            device=self.device).repeat(b)", GROUP_TESTS),
]


def copy_project(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / f).is_file():
            shutil.copy2(ROOT / f, dst / f)


def main(argv: list[str] | None = None) -> int:
    override = argv if argv is not None else sys.argv[1:]
    survived = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy_project(work)
        for name, path, old, new, tests in MUTATIONS:
            source = (work / path).read_text()
            if source.count(old) != 1:
                raise SystemExit(f"{name}: {old!r} occurs {source.count(old)} times in {path}; update the mutation")
            (work / path).write_text(source.replace(old, new))
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                      *(override or [tests])],
                                     cwd=work, env={"PYTHONPATH": str(work), "PATH": "/usr/bin:/bin"},
                                     capture_output=True, text=True)
            finally:
                (work / path).write_text(source)
            failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
            verdict = "killed" if run.returncode == 1 else "SURVIVED" if run.returncode == 0 else f"error {run.returncode}"
            print(f"{verdict:9} {name}: {failed[0].removeprefix('FAILED ') if failed else ''}", flush=True)
            if run.returncode != 1:
                survived.append(name)
    print(f"{len(MUTATIONS) - len(survived)}/{len(MUTATIONS)} killed")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
