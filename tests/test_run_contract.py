"""The run contract under faults: one writer, one configuration, divergence, signals, damage.

Each test injects the fault it is about (a second launch, a changed configuration, NaN at a
chosen step, SIGTERM / SIGINT, a damaged metrics line, a truncated checkpoint) and checks that
nothing is lost, the run is filed under what it computes, and the message says what to do.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from shine.harness.runtime import JsonlMetrics, RunDirectory, WandbMirror
from shine.harness.runtime.lock import RunLock, RunLockedError
from shine.harness.runtime.run_dir import CorruptCheckpointError, config_diff
from shine.harness.training.trainer import Diverged, Trainer, nonfinite

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the harness under test)

EXIT = train.EXIT_CODES
BREAST = ["+experiment=breast_cancer", "method=shine", "seed=0"]


def launch(args, runs: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "train.py", *args, f"paths.log_dir={runs}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def run_train(args, runs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = launch(args, runs)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def steps_of(path: Path) -> list[int]:
    return [r["step"] for r in JsonlMetrics(path / "metrics.jsonl").read()]


# ------------------------------------------------------------------------------ one writer
HOLDER = textwrap.dedent(
    """
    import sys, time
    from shine.harness.runtime.lock import RunLock
    lock = RunLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(60)
    """
)


def test_a_second_writer_fails_fast_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host"):
            RunLock(tmp_path / "run").acquire()
        assert time.perf_counter() - t0 < 5  # fails fast, does not wait
    finally:
        holder.kill()
        holder.wait()
    # the OS released the lock of the killed holder: the next writer reports and takes over
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert lock.read_holder()["pid"] == os.getpid()
    lock.release()
    assert lock.read_holder() is None


def write_holder(path: Path, host: str, heartbeat_age: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {"host": host, "pid": 4242, "started": "then", "since": now - 1e4}
    (path / ".lock.json").write_text(json.dumps({**record, "heartbeat": now - heartbeat_age}))


def test_holder_on_another_host_is_respected_until_its_heartbeat_is_stale(tmp_path, caplog):
    # a shared file system that does not propagate flock: only the holder record tells
    write_holder(tmp_path / "run", "node-b", heartbeat_age=5)
    with pytest.raises(RunLockedError, match="pid 4242 on host node-b"):
        RunLock(tmp_path / "run", stale_after_s=60).acquire()
    write_holder(tmp_path / "run", "node-b", heartbeat_age=120)
    lock = RunLock(tmp_path / "run", stale_after_s=60)
    lock.acquire()
    assert "ended without releasing its lock" in caplog.text and "node-b" in caplog.text
    lock.release()
    # this host: the OS lock proves the recorded process gone, whatever its heartbeat
    write_holder(tmp_path / "run", socket.gethostname(), heartbeat_age=1)
    lock.acquire()
    lock.release()


def test_two_launches_of_one_command_do_not_interleave(tmp_path):
    runs = tmp_path / "runs"
    args = ["+experiment=digits", "method=shine", "trainer.epochs=1", "trainer.pretrain_steps=4"]
    args += ["trainer.checkpoint_every=5", "task.eval_limit=64"]
    first = launch(args, runs)
    run = runs / "digits_shine" / "task.eval_limit=64,trainer.epochs=1,trainer.pretrain_steps=4"
    run = run / "seed=0"
    deadline = time.time() + 120
    while not (run / ".lock.json").is_file() and time.time() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run while the second launch arrives
    try:
        second = run_train(args, runs, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert second.returncode == EXIT["locked"], second.stdout[-2000:]
    assert f"pid {first.pid}" in second.stdout and "another launch" in second.stdout
    assert first.returncode == 0, out[-2000:]
    steps = steps_of(run)
    assert steps == list(range(len(steps))) and len(steps) > 10  # no step twice, none missing


# --------------------------------------------------------------------- run identity, resume
def test_config_change_refuses_the_resume_and_neutral_keys_do_not(tmp_path):
    runs = tmp_path / "runs"
    cut = run_train([*BREAST, "task.trainer.stop_after=5"], runs)
    assert cut.returncode == 0, cut.stdout[-2000:]
    run = runs / "breast_cancer_shine" / "seed=0"
    assert steps_of(run) == list(range(6)) and not (run / "summary.json").exists()
    # the experiment file changed meanwhile (simulated on the stored config): refused
    stored = yaml.safe_load((run / "config.yaml").read_text())
    edited = json.loads(json.dumps(stored))
    edited["task"]["method"]["tolerance"]["decrease"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    refused = run_train(BREAST, runs)
    assert refused.returncode == EXIT["config"], refused.stdout[-2000:]
    assert "decrease: 0.5" in refused.stdout and "overwrite=true" in refused.stdout
    assert "python train.py" in refused.stdout  # the original command
    assert steps_of(run) == list(range(6))  # nothing touched
    # with its own configuration and other threads / checkpointing it resumes and finishes
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    done = run_train([*BREAST, "trainer.num_threads=2", "task.trainer.checkpoint_every=3"], runs)
    assert done.returncode == 0, done.stdout[-2000:]
    assert steps_of(run) == list(range(30))
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    # a complete run is found complete by its own command, and refused to another configuration
    again = run_train([*BREAST, "trainer.num_threads=2"], runs)
    assert again.returncode == 0 and "run already complete" in again.stdout, again.stdout[-2000:]
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    other = run_train(BREAST, runs)
    assert other.returncode == EXIT["config"], other.stdout[-2000:]
    assert "holds a complete run of another configuration" in other.stdout
    assert "decrease: 0.5" in other.stdout
    assert steps_of(run) == list(range(30))


def test_config_diff_ignores_the_result_neutral_keys():
    a = {
        "seed": 0,
        "logger": {"mirror": {"mode": "disabled"}},
        "task": {"trainer": {"log_every": 0}},
    }
    b = {
        "seed": 0,
        "logger": {"mirror": {"mode": "offline"}},
        "task": {"trainer": {"log_every": 5}},
    }
    assert config_diff(a, b) == []
    assert config_diff(a, {**b, "seed": 1}) != []


def test_summary_method_is_the_method_choice(caplog):
    # the one method choice names the summary's method; a disagreeing hand-written name is
    # replaced (with a warning), in the task and in the method node alike
    cfg = train.OmegaConf.create(
        {"task": {"_target_": "shine.harness.tasks.ImageClassification", "method_name": "shine"}}
    )
    cfg.method = {"name": "shine"}
    train.name_the_method(cfg, {"method": "shine_refine", "setting": "deq"})
    assert cfg.task.method_name == "shine_refine" and cfg.method.name == "shine_refine"
    assert "disagrees with the method choice method=shine_refine" in caplog.text
    # the studies that compare methods inside their task have no method_name: untouched
    cfg = train.OmegaConf.create(
        {"task": {"_target_": "shine.harness.tasks.deq_timing.DEQTiming"}}
    )
    train.name_the_method(cfg, {"method": "none"})
    assert "method_name" not in cfg.task


def test_a_method_experiment_without_a_method_is_refused_and_leaves_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "+experiment=digits", f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == train.EXIT_CODES["usage"], proc.stderr[-2000:]
    assert "add method=NAME, one of jacobian_free," in proc.stdout + proc.stderr
    assert "shine_refine" in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == [], "a refused run leaves no directory behind"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.max_step=3", "trainer.max_step is not a trainer setting"),
        ("trainer.epochs=0", "trainer.epochs must be >= 1, got 0"),
        ("trainer.f_tol=nan", "trainer.f_tol must be finite and > 0"),
        ("trainer.batch_size=abc", "full_key: trainer.batch_size"),
        ("trainer.max_step=3", "Could not override 'trainer.max_step'"),
        ("method.solver.max_iter=0", "solver.max_iter must be >= 1 to train a DEQ"),
        ("method.solver.max_iter=abc", "Broyden.max_iter must be int, got 'abc' (str)"),
        ("method.solver.tol=-1", "Broyden.tol must be >= 0.0, got -1"),
        ("+method.solver.max_itr=3", "unexpected keyword argument 'max_itr'"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_built(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, "train.py", "+experiment=digits", "method=shine", override]
        + [f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-2000:]
    assert "Traceback" not in out
    assert not list(tmp_path.rglob("metrics.jsonl")), "nothing ran"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.lambda0=nan", "lambda0 must be finite"),
        ("method.max_iter=0", r"max_iter \(outer iterations\) must be >= 1"),
        ("method.max_inner_iter=0", "max_inner_iter must be >= 1"),
    ],
)
def test_bilevel_methods_refuse_bad_settings_when_built(override, message):
    with pytest.raises(Exception, match=message) as err:
        train.compose_task(["+experiment=breast_cancer", "method=shine", override])
    assert "full_key: task.method" in str(err.value), "the error names the config key"


# ------------------------------------------------------------------------------ divergence
class FakeStepper:
    """λ-like state that becomes NaN at ``bad_step``; ``skip()`` moves past a bad step."""

    def __init__(self, n: int, bad_step: int, skippable: bool = True) -> None:
        self.n, self.bad, self.i, self.x = n, bad_step, 0, 1.0
        if skippable:
            self.skip = self._skip

    @property
    def finished(self) -> bool:
        return self.i >= self.n

    def step(self):
        self.i += 1
        self.x = math.nan if self.i == self.bad else self.x * 0.5
        return {"loss": self.x}

    def _skip(self) -> None:
        self.i += 1

    def state_dict(self):
        return {"i": self.i, "x": self.x}

    def load_state_dict(self, state):
        self.i, self.x = state["i"], state["x"]


def started(path: Path) -> RunDirectory:
    run_dir = RunDirectory(path)
    run_dir.start("config: test\n")
    return run_dir


def test_nan_at_a_chosen_step_stops_with_the_last_finite_values(tmp_path):
    run_dir = started(tmp_path / "run")
    with pytest.raises(Diverged) as err:
        Trainer().run(FakeStepper(10, bad_step=4), run_dir)
    assert err.value.step == 4 and err.value.cause == "loss = nan"
    assert err.value.last_finite == {"step": 3, "loss": 0.125}
    assert steps_of(tmp_path / "run") == [0, 1, 2, 3, 4]  # the diverged record is kept


def test_skip_step_undoes_the_step_and_goes_on(tmp_path):
    run_dir = started(tmp_path / "run")
    records = Trainer(on_nonfinite="skip_step").run(FakeStepper(8, bad_step=4), run_dir)
    skipped = [r for r in records if "skipped_nonfinite" in r]
    assert [r["step"] for r in skipped] == [4]
    losses = [r["loss"] for r in records[1:] if "skipped_nonfinite" not in r]
    assert all(math.isfinite(v) for v in losses) and losses[-1] == 0.5**7  # 8 batches, one skipped
    with pytest.raises(ValueError, match="cannot skip a step"):
        Trainer(on_nonfinite="skip_step").run(
            FakeStepper(8, 4, skippable=False), started(tmp_path / "b")
        )


def test_nonfinite_sees_lists_and_logged_nulls():
    assert nonfinite({"log_lambda": [0.1, float("inf")]}, ("log_lambda",)) == "log_lambda = inf"
    assert nonfinite({"loss": None}, ("loss",)) == "loss = None"
    assert nonfinite({"loss": 1.0, "other": math.nan}, ("loss",)) is None


def test_a_diverged_run_ends_as_diverged_and_says_so_again(tmp_path):
    runs = tmp_path / "runs"
    # a finite start whose regularisation e^800 overflows float64: NaN at the first step (a
    # non-finite lambda0 itself is refused when HOAG is built)
    res = run_train([*BREAST, "method.lambda0=800"], runs)
    assert res.returncode == EXIT["diverged"], res.stdout[-2000:]
    run = runs / "breast_cancer_shine" / "method.lambda0=800" / "seed=0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["status_details"]["step"] == 1
    assert "nan" in summary["status_details"]["cause"].lower()
    again = run_train([*BREAST, "method.lambda0=800"], runs)
    assert again.returncode == EXIT["diverged"]
    assert "diverged at step 1" in again.stdout and "overwrite=true" in again.stdout


@pytest.mark.slow
def test_a_diverging_training_stops_without_crashing_the_summary(tmp_path):
    runs = tmp_path / "runs"
    # the settings of the report: NaN from step 17
    args = ["+experiment=digits", "method=shine", "optim.lr=1e8", "trainer.epochs=2"]
    args += ["trainer.pretrain_steps=20", "task.eval_limit=64"]
    res = run_train(args, runs)
    assert res.returncode == EXIT["diverged"], res.stdout[-3000:]
    assert "TypeError" not in res.stdout and "non-finite loss" in res.stdout
    (summary,) = runs.glob("digits_shine/*/seed=0/summary.json")
    data = json.loads(summary.read_text())
    assert data["status"] == "diverged" and data["method"] == "shine"


# --------------------------------------------------------------------------------- signals
def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-3000:])
        if (run / "metrics.jsonl").is_file() and max(steps_of(run), default=-1) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


DIGITS = ["+experiment=digits", "method=shine", "trainer.epochs=2", "trainer.pretrain_steps=4"]
DIGITS += ["trainer.checkpoint_every=1000", "task.eval_limit=64"]


def digits_run(runs: Path) -> Path:
    # trainer.checkpoint_every is result-neutral: not in the name
    name = "task.eval_limit=64,trainer.epochs=2,trainer.pretrain_steps=4"
    return runs / "digits_shine" / name / "seed=0"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_checkpoints_the_current_step_and_exits_interrupted(tmp_path, sig):
    runs = tmp_path / "runs"
    proc = launch(DIGITS, runs)
    run = digits_run(runs)
    wait_for_step(run, 6, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT["interrupted"], out[-3000:]
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    step = payload["step"]
    assert f"interrupted at step {step}; run the same command to resume" in out
    assert steps_of(run) == list(range(step + 1))  # nothing lost past the checkpoint
    assert "interrupted at step" in (run / "train.log").read_text()
    resumed = run_train(DIGITS, runs)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert steps_of(run) == list(range(len(steps_of(run)))) and len(steps_of(run)) > step + 1


def test_first_ctrl_c_requests_a_stop_the_second_exits_at_once(tmp_path):
    run_dir = RunDirectory(tmp_path / "run")
    before = signal.getsignal(signal.SIGINT)
    with train.stop_on_signals(run_dir):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert run_dir.stop_requested and run_dir.stop_reason == "SIGTERM"
        assert run_dir.should_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after a stop request
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    fresh = RunDirectory(tmp_path / "other")
    with train.stop_on_signals(fresh):
        os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C only asks to stop
        time.sleep(0.01)
    assert fresh.stop_requested and fresh.stop_reason == "SIGINT"


def test_a_failed_run_writes_its_traceback_to_train_log(tmp_path):
    # a run that fails while running (its data set is missing) logs the traceback; a setting a
    # constructor refuses is reported in one line instead (test_bad_settings_are_refused...)
    runs, data = tmp_path / "runs", tmp_path / "no_data"
    data.mkdir()
    res = run_train(["+experiment=news20", "method=shine", f"paths.data_dir={data}"], runs)
    assert res.returncode != 0
    log = (runs / "news20_shine" / "seed=0" / "train.log").read_text()
    assert "Traceback" in log and "the run failed" in log and "20news not found" in log


def test_a_refused_setting_is_one_line_naming_it(tmp_path):
    runs = tmp_path / "runs"
    res = run_train([*BREAST, "task.loss=hinge"], runs)
    assert res.returncode == EXIT["usage"]
    log = (runs / "breast_cancer_shine" / "task.loss=hinge" / "seed=0" / "train.log").read_text()
    assert "invalid configuration" in log and "hinge" in log and "Traceback" not in log


# ------------------------------------------------------------------------- damaged files
def test_a_damaged_middle_line_is_moved_aside_with_its_offset(tmp_path):
    metrics = JsonlMetrics(tmp_path / "metrics.jsonl")
    for step in range(4):
        metrics.append(step, {"loss": 1.0 / (step + 1)})
    lines = metrics.path.read_bytes().split(b"\n")
    offset = len(lines[0]) + 1
    lines[1] = b'{"step": 1, "loss": 0.5\x00garbage'
    metrics.path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + b'{"step": 4, "lo')  # torn last
    moved, torn = metrics.repair()
    assert (moved, torn) == (1, True)
    assert [r["step"] for r in metrics.read()] == [0, 2, 3]
    (entry,) = [json.loads(x) for x in metrics.corrupt_path.read_text().splitlines()]
    assert entry["offset"] == offset and entry["line"].startswith('{"step": 1')
    assert metrics.repair() == (0, False)  # idempotent


def test_resume_keeps_a_damaged_line_instead_of_dropping_it(tmp_path):
    run_dir = started(tmp_path / "run")
    for step in range(5):
        run_dir.log_metrics(step, {"loss": float(step)})
    run_dir.save_checkpoint({"w": torch.ones(1)}, step=4)
    path = run_dir.metrics.path
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-3] + "#!"
    path.write_text("\n".join(lines) + "\n")
    RunDirectory(tmp_path / "run").start("config: test\n")
    assert [r["step"] for r in JsonlMetrics(path).read()] == [0, 1, 3, 4]
    assert run_dir.metrics.corrupt_path.is_file()


def test_a_truncated_checkpoint_is_named_with_the_way_out(tmp_path):
    runs = tmp_path / "runs"
    cut = run_train([*BREAST, "task.trainer.stop_after=4"], runs)
    assert cut.returncode == 0
    run = runs / "breast_cancer_shine" / "seed=0"
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    res = run_train(BREAST, runs)
    assert res.returncode == EXIT["damaged"], res.stdout[-2000:]
    assert str(last) in res.stdout and "prev.pt (step 3) is intact" in res.stdout
    last.rename(last.with_suffix(".pt.damaged"))  # the fix the message gives
    done = run_train(BREAST, runs)
    assert done.returncode == 0, done.stdout[-2000:]
    assert steps_of(run) == list(range(30))


def test_unreadable_checkpoint_without_predecessor(tmp_path):
    run_dir = started(tmp_path / "run")
    run_dir.checkpoint_path.parent.mkdir(parents=True)
    run_dir.checkpoint_path.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match="no predecessor"):
        run_dir.load_checkpoint()


# --------------------------------------------------------------------------------- wandb
class FakeRun:
    def __init__(self, log):
        self.log_calls, self.summary, self.init = log, {}, None

    def log(self, row, step):
        pass

    def finish(self):
        pass


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    inits = []

    class FakeWandb:
        @staticmethod
        def init(**kw):
            inits.append(kw)
            return FakeRun([])

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    first = RunDirectory(tmp_path / "run", mirror=WandbMirror("offline"))
    first.start("config: test\n")
    first.save_checkpoint({"w": torch.ones(1)}, step=0)
    first.close()
    second = RunDirectory(tmp_path / "run", mirror=WandbMirror("offline"))
    second.start("config: test\n")
    assert inits[0]["id"] == inits[1]["id"] == (tmp_path / "run" / "wandb_id").read_text().strip()
    assert inits[1]["resume"] == "allow"


# ------------------------------------------------------------------------------- threads
def test_thread_policy_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        train.apply_thread_policy(train.OmegaConf.create({"trainer": {"num_threads": 1}}))
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads"):
            train.apply_thread_policy(train.OmegaConf.create({"trainer": {"num_threads": 0}}))
        train.apply_thread_policy(train.OmegaConf.create({"trainer": {"num_threads": None}}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
