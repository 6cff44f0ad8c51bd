"""Fault-injection driver: SIGKILL the real ``srlm run`` process over and over, check the
run directory after every kill, and compare the finished run with an uninterrupted one.

The job is a tiny three-stage run (SFT, then two self-rewarding DPO iterations whose
judge is the model itself) on an x-transformers model with a byte tokenizer, written as a
YAML config by :func:`write_job`. Each *chain* starts a fresh run folder and runs ``srlm
run`` on it repeatedly; each process is killed with SIGKILL at a seeded random point,
then the next one resumes. Kill points come in two families:

* **watched** from outside (this process polls the run folder every few milliseconds):
  when a file (SFT / DPO ``metrics.jsonl``, ``candidates.jsonl``) reaches a number of
  lines, wait a random delay and kill; or kill after a random time;
* **trapped** inside ``srlm`` (``tests/fault_inject/sitecustomize.py``, armed by the
  ``SRLM_FAULT`` variable): right after sampling candidates, inside judging, in the
  middle of a JSONL append (torn last line), while a checkpoint folder is written or
  swapped, and just before ``state.json`` commits a stage. These windows are too narrow
  to hit reliably from outside.

After every kill (:func:`check_transition`): ``state.json`` parses and lists a prefix of
the plan; every checkpoint folder present loads; records complete before the kill are
still there, unchanged, in order, each id once; a stage committed before the kill kept
its checkpoint (same inode and mtime) and its files byte for byte (it was not run
again). After the last run (:func:`check_final`): every stage finished once, and the
candidates, pairs and stats files are byte-identical to the uninterrupted reference run's
and the checkpoints hold equal tensors.

Run standalone for a long campaign::

    python tests/fault_job.py --trials 200 --workdir /tmp/faults
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAP_DIR = HERE / "fault_inject"
PLAN = ["01-sft", "02-self-reward-dpo", "03-self-reward-dpo"]
JSONL_FILES = ("candidates.jsonl", "pairs.jsonl")
COMPARED_FILES = ("candidates.jsonl", "pairs.jsonl", "stats.json")
CKPT = "checkpoint/model.safetensors"

_DPO_STAGE = """  - kind: self_reward_dpo
    num_preference_pairs: 8
    max_new_tokens: 8
    judge_settings: {num_samples: 1, max_new_tokens: 12}
    chunk_size: 2
    min_parse_rate: 0.0
    temperature: 1.0
    top_p: 1.0
    trainer: {batch_size: 4, num_train_steps: 6, beta: 0.5, start_learning_rate: 0.003}
"""

JOB_YAML = (
    """\
# tiny three-stage job for the fault suite: SFT, then two self-rewarding DPO iterations
model:
  xtransformers: {num_tokens: 256, max_seq_len: 64, attn_layers: {dim: 16, depth: 1, heads: 2}}
tokenizer: {kind: bytes, eos_id: 10}
data:
  sft: {path: sft.jsonl}
  prompts: {path: prompts.jsonl}
reward_config:
  prompt_template: "Rate {{ prompt }} => {{ response }}:"
  reward_regex_template: "{{ reward }}"
  score_range: [0, 9]
accelerate: {cpu: true}
seed: 0
progress: false
preference_max_seq_len: 64
stages:
  - {kind: sft, trainer: {batch_size: 4, num_train_steps: 12, start_learning_rate: 0.003}}
"""
    + _DPO_STAGE
    + _DPO_STAGE
    + "out: run\n"
)


def write_job(folder: str | Path) -> Path:
    """Write the job's data files and YAML config into ``folder``; returns the config path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["abc", "hello", "xyz", "ok", "four", "cat", "dog", "sun"]
    sft = [
        {"prompt": f"say {words[i % 8]}", "response": f"{words[i % 8]} {i % 10}"} for i in range(16)
    ]
    prompts = [{"prompt": f"prompt {i}"} for i in range(200)]
    for name, rows in (("sft.jsonl", sft), ("prompts.jsonl", prompts)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = folder / "job.yaml"
    config.write_text(JOB_YAML)
    return config


def srlm_argv() -> list[str]:
    """The installed ``srlm`` console script (falls back to ``python -c`` on its entry point)."""
    exe = Path(sys.executable).parent / "srlm"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("srlm")
    if found:
        return [found]
    return [
        sys.executable,
        "-c",
        "from self_rewarding_lm_pytorch.cli import main; raise SystemExit(main())",
    ]


def job_env(run_dir: Path, fault: str | None = None) -> dict[str, str]:
    """Environment of one ``srlm run``: one thread (bitwise-reproducible CPU math), the trap
    folder on ``PYTHONPATH`` (inert unless ``fault`` is given)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SRLM_FAULT", "SRLM_FAULT_RUN")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TRAP_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    if fault:
        env["SRLM_FAULT"] = fault
        env["SRLM_FAULT_RUN"] = str(run_dir)
    return env


def job_command(config: Path, run_dir: Path) -> list[str]:
    return [*srlm_argv(), "-q", "run", str(config), "--out", str(run_dir)]


def run_job(config: Path, run_dir: Path, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run (or resume) the job to the end, uninterrupted."""
    return subprocess.run(
        job_command(config, run_dir),
        env=job_env(run_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ====================================================================== kill points


@dataclass
class Trigger:
    """Where to kill: a trap spec (``EVENT:STAGE:N``), a watched file reaching ``lines``
    lines (then ``delay`` seconds), or a time after start (``delay`` seconds)."""

    kind: str  # "trap" | "lines" | "time"
    phase: str  # what the job is doing when it dies (for the report)
    spec: str = ""
    file: str = ""
    lines: int = 0
    delay: float = 0.0

    def describe(self) -> str:
        if self.kind == "trap":
            return f"{self.phase}: trap {self.spec}"
        if self.kind == "lines":
            return f"{self.phase}: {self.file} >= {self.lines} lines, +{self.delay * 1000:.0f} ms"
        return f"{self.phase}: {self.delay:.2f} s after start"


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def trigger_options(rng: random.Random, run_dir: Path, target_stage: int) -> list[Trigger]:
    """Every kind of kill point in stage ``target_stage`` (an index into :data:`PLAN`),
    with seeded random parameters."""
    name = PLAN[target_stage]
    s = name[:2]
    # a rerun of an unfinished stage sets the interrupted attempt's metrics.jsonl aside
    # (metrics.interrupted-<k>.jsonl) and logs afresh, so count from zero
    logged = 0
    ckpt = [
        Trigger("trap", "checkpoint-writing", spec=f"ckpt-write:{s}:1"),
        Trigger("trap", "checkpoint-writing", spec=f"ckpt-swap:{s}:1"),
        Trigger("trap", "state-commit", spec=f"state:{s}:1"),
    ]
    if target_stage == 0:  # SFT
        metrics = f"{name}/metrics.jsonl"
        return ckpt + [
            Trigger(
                "lines",
                "sft-training",
                file=metrics,
                lines=logged + rng.randint(1, 11),
                delay=rng.uniform(0, 0.03),
            ),
            Trigger(
                "lines",
                "sft-training",
                file=metrics,
                lines=logged + rng.randint(1, 11),
                delay=rng.uniform(0, 0.03),
            ),
            Trigger("time", "timed", delay=rng.uniform(0.3, 4.0)),
        ]
    training = [
        Trigger(
            "lines",
            "dpo-training",
            file=f"{name}/metrics.jsonl",
            lines=logged + rng.randint(1, 5),
            delay=rng.uniform(0, 0.02),
        ),
        Trigger("time", "timed", delay=rng.uniform(0.3, 6.0)),
    ]
    if (run_dir / name / "stats.json").exists():  # all pairs built: no more generation
        return ckpt + training
    have = count_lines(run_dir / name / "candidates.jsonl")
    return (
        ckpt
        + training
        + [
            Trigger("trap", "candidate-generation", spec=f"gen:{s}:{rng.randint(1, 2)}"),
            Trigger(
                "lines",
                "candidate-generation",
                file=f"{name}/candidates.jsonl",
                lines=have + rng.randint(1, 4),
                delay=rng.uniform(0, 0.15),
            ),
            Trigger("trap", "judging", spec=f"judge:{s}:{rng.randint(1, 2)}"),
            Trigger("trap", "record-append", spec=f"torn-candidates:{s}:{rng.randint(1, 2)}"),
            Trigger("trap", "record-append", spec=f"torn-pairs:{s}:1"),
        ]
    )


class TriggerDeck:
    """Draws kill points without replacement per set of options (SFT; DPO while pairs
    are built; DPO once they are), reshuffling when a deck runs out, so a few dozen
    trials cover every kind of kill point.

    The swap window (old checkpoint moved aside, new one not yet renamed in) exists only
    when a stage's checkpoint is written over an earlier one: a stage whose checkpoint
    was written by an attempt killed before it committed. When no such checkpoint is
    there, a swap draw first kills at the commit (leaving one), then in the swap."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.decks: dict[tuple[str, ...], list[int]] = {}
        self.pending: Trigger | None = None

    def draw(self, run_dir: Path, target_stage: int) -> Trigger:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            if pending.spec.split(":")[1] == PLAN[target_stage][:2]:
                return pending
        options = trigger_options(self.rng, run_dir, target_stage)
        deck = self.decks.setdefault(tuple(o.phase for o in options), [])
        if not deck:
            deck.extend(range(len(options)))
            self.rng.shuffle(deck)
        trigger = options[deck.pop()]
        if trigger.spec.startswith("ckpt-swap:"):
            if not (run_dir / PLAN[target_stage] / "checkpoint").exists():
                self.pending = trigger
                return Trigger("trap", "state-commit", spec=f"state:{trigger.spec.split(':')[1]}:1")
        return trigger


def run_and_kill(
    config: Path, run_dir: Path, trigger: Trigger, *, timeout: float = 300
) -> tuple[int, str]:
    """Start ``srlm run`` and SIGKILL it at ``trigger``; returns (returncode, stderr tail).
    A return code of ``-SIGKILL`` means the kill happened; 0 means the run finished first."""
    fault = trigger.spec if trigger.kind == "trap" else None
    proc = subprocess.Popen(
        job_command(config, run_dir),
        env=job_env(run_dir, fault),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.monotonic()
    deadline = start + timeout
    try:
        if trigger.kind != "trap":
            watched = run_dir / trigger.file if trigger.kind == "lines" else None
            while proc.poll() is None and time.monotonic() < deadline:
                if watched is None:
                    if time.monotonic() - start >= trigger.delay:
                        break
                elif count_lines(watched) >= trigger.lines:
                    time.sleep(trigger.delay)
                    break
                time.sleep(0.002)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return -999, f"timed out after {timeout} s\n{err[-2000:]}"
    return proc.returncode, (err or "")[-3000:]


# ====================================================================== checks


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def complete_records(path: Path) -> list[bytes]:
    """The complete lines (ending in a newline) of a JSONL file, as raw bytes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@dataclass
class Snapshot:
    """What a run folder holds at one instant (after a kill)."""

    finished: list[str]
    committed: dict[str, dict] = field(default_factory=dict)  # stage -> ckpt stat + file hashes
    records: dict[str, list[bytes]] = field(default_factory=dict)  # relpath -> complete lines
    problems: list[str] = field(default_factory=list)


def snapshot(run_dir: Path) -> Snapshot:
    """Read the run folder and check what must hold at any instant."""
    problems: list[str] = []
    finished: list[str] = []
    state_path = run_dir / "state.json"
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
            finished = [r["stage"] for r in state["finished"]]
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"state.json is unreadable: {exc}")
    if finished != PLAN[: len(finished)]:
        problems.append(f"state.json lists {finished}, not a prefix of the plan {PLAN}")
    snap = Snapshot(finished=finished, problems=problems)
    for name in PLAN:
        stage_dir = run_dir / name
        ckpt = stage_dir / CKPT
        if ckpt.exists():
            try:
                load_tensors(ckpt)
            except Exception as exc:  # any failure to load is a finding
                problems.append(f"{name}: checkpoint does not load: {exc}")
        elif (stage_dir / "checkpoint").exists():
            problems.append(f"{name}: checkpoint folder without {CKPT}")
        if name in finished:
            if not ckpt.exists():
                problems.append(f"{name} is committed but has no checkpoint")
                continue
            st = ckpt.stat()
            snap.committed[name] = {
                "ckpt": (st.st_ino, st.st_mtime_ns, st.st_size),
                **{f: _sha(stage_dir / f) for f in (*COMPARED_FILES, "metrics.jsonl")},
            }
        for f in JSONL_FILES:
            rel = f"{name}/{f}"
            snap.records[rel] = complete_records(run_dir / rel)
            ids = [json.loads(r)["id"] for r in snap.records[rel]]
            if len(ids) != len(set(ids)):
                problems.append(
                    f"{rel}: duplicated ids {sorted({i for i in ids if ids.count(i) > 1})}"
                )
    return snap


def check_transition(before: Snapshot, after: Snapshot) -> list[str]:
    """What a later process may not have done to what an earlier one left."""
    problems = []
    if after.finished[: len(before.finished)] != before.finished:
        problems.append(f"finished stages went from {before.finished} to {after.finished}")
    for name, stats in before.committed.items():
        now = after.committed.get(name)
        if now != stats:
            changed = sorted(k for k in stats if now is None or now.get(k) != stats[k])
            problems.append(f"{name} was committed, but a later run rewrote {changed}")
    for rel, recs in before.records.items():
        later = after.records.get(rel, [])
        if later[: len(recs)] != recs:
            lost = [json.loads(r)["id"] for r in recs if r not in later]
            problems.append(
                f"{rel}: records present before the kill were lost or changed (ids {lost[:5]})"
            )
    return problems


def check_final(run_dir: Path, reference: Path) -> list[str]:
    """The finished run equals the uninterrupted reference run."""
    import torch

    snap = snapshot(run_dir)
    problems = list(snap.problems)
    if snap.finished != PLAN:
        problems.append(f"finished stages {snap.finished}, expected {PLAN}")
    for name in PLAN:
        for f in COMPARED_FILES:
            if _sha(run_dir / name / f) != _sha(reference / name / f):
                problems.append(f"{name}/{f} differs from the uninterrupted run's")
        try:
            got, want = load_tensors(run_dir / name / CKPT), load_tensors(reference / name / CKPT)
        except Exception as exc:
            problems.append(f"{name}: checkpoint does not load: {exc}")
            continue
        if got.keys() != want.keys() or any(not torch.equal(got[k], want[k]) for k in want):
            problems.append(f"{name}: checkpoint tensors differ from the uninterrupted run's")
    return problems


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files or folders left behind by killed writes."""
    return sorted(
        str(p.relative_to(run_dir))
        for p in run_dir.rglob(".*")
        if ".tmp" in p.name or ".old-" in p.name
    )


def duplicated_metric_steps(run_dir: Path) -> dict[str, int]:
    """Per stage, how many ``metrics.jsonl`` lines repeat an earlier line's step."""
    out = {}
    for name in PLAN:
        steps = [
            json.loads(line).get("step")
            for line in complete_records(run_dir / name / "metrics.jsonl")
        ]
        dup = len(steps) - len(set(steps))
        if dup:
            out[name] = dup
    return out


# ====================================================================== campaign


@dataclass
class Report:
    kills: int = 0
    runs: int = 0
    chains: int = 0
    kill_points: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    leftover_temp_paths: int = 0
    duplicated_metric_lines: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_campaign(
    workdir: str | Path,
    *,
    trials: int = 30,
    kills_per_chain: int = 10,
    seed: int = 0,
    timeout: float = 300,
) -> Report:
    """Run ``trials`` kills (in chains of ``kills_per_chain``) against one reference run."""
    t0 = time.monotonic()
    workdir = Path(workdir)
    config = write_job(workdir / "job")
    report = Report()
    reference = workdir / "reference"
    done = run_job(config, reference, timeout=timeout)
    report.runs += 1
    if done.returncode != 0:
        report.failures.append(
            f"reference run failed (rc {done.returncode}):\n{done.stderr[-3000:]}"
        )
        return report
    deck = TriggerDeck(random.Random(seed))
    chain = 0
    while report.kills < trials:
        chain += 1
        report.chains += 1
        run_dir = workdir / f"chain-{chain:03d}"
        planned = min(kills_per_chain, trials - report.kills)
        before = snapshot(run_dir)
        finished_early = False
        for i in range(planned):
            target = max(len(before.finished), (i * len(PLAN)) // planned)
            if target >= len(PLAN):
                break
            trigger = deck.draw(run_dir, target)
            rc, err = run_and_kill(config, run_dir, trigger, timeout=timeout)
            report.runs += 1
            where = f"chain {chain} kill {i + 1} ({trigger.describe()})"
            if rc == 0:
                finished_early = True
            elif rc != -signal.SIGKILL:
                report.failures.append(f"{where}: srlm exited with {rc}:\n{err}")
                break
            else:
                report.kills += 1
                key = f"{trigger.phase}@{PLAN[target][:2]}"
                report.kill_points[key] = report.kill_points.get(key, 0) + 1
            after = snapshot(run_dir)
            report.failures += [
                f"{where}: {p}" for p in after.problems + check_transition(before, after)
            ]
            before = after
            if finished_early:
                break
        if not finished_early:
            done = run_job(config, run_dir, timeout=timeout)
            report.runs += 1
            if done.returncode != 0:
                report.failures.append(
                    f"chain {chain}: the resuming run failed (rc {done.returncode}):\n{done.stderr[-3000:]}"
                )
                continue
            after = snapshot(run_dir)
            report.failures += [
                f"chain {chain} resume: {p}" for p in check_transition(before, after)
            ]
        report.failures += [f"chain {chain} final: {p}" for p in check_final(run_dir, reference)]
        report.leftover_temp_paths += len(leftovers(run_dir))
        report.duplicated_metric_lines += sum(duplicated_metric_steps(run_dir).values())
        if len(report.failures) > 20:
            break
    report.seconds = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=int(os.environ.get("SRLM_FAULT_TRIALS", 30)))
    parser.add_argument("--kills-per-chain", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="kept afterwards (default: a temp folder)")
    args = parser.parse_args(argv)
    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="srlm-faults-")
    report = run_campaign(
        workdir, trials=args.trials, kills_per_chain=args.kills_per_chain, seed=args.seed
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
