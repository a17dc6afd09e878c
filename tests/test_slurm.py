"""Both SLURM routes (``slurm/train.sbatch``, Hydra's submitit launcher) on a real cluster.

The tests marked ``slow`` share a single-node cluster started from Debian's slurm-wlm and munge
(``tests/helpers/slurm_cluster.py``; installed with apt-get when missing and we are root) and are
skipped, with the reason, where it cannot start. Jobs are tiny breast-cancer runs on CPU;
completion is polled with ``squeue`` (no ``sacct``: there is no accounting database). The
launcher profiles are checked against the plugin's schema without a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers.slurm_cluster import FINAL_STATES, SlurmCluster, SlurmUnavailable, start_cluster
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / "slurm" / "train.sbatch"
LAUNCHERS = ROOT / "configs" / "hydra" / "launcher"
SLURM_PROFILES = ["slurm", "slurm_gpu4", "slurm_multinode"]
EXPERIMENT = ("+experiment=breast_cancer", "method=shine")


def launcher_config(profile: str, env: dict[str, str] | None = None) -> dict:
    """``hydra.launcher`` of ``train.py +experiment=... hydra/launcher=PROFILE``, resolved."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[*EXPERIMENT, f"hydra/launcher={profile}"],
                return_hydra_config=True,
            )
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
        launcher.pop("submitit_folder")  # ${hydra.sweep.dir}: multirun only
        launcher.pop("name")  # ${hydra.job.name}: set at run time
        return OmegaConf.to_container(OmegaConf.create(launcher), resolve=True)


@pytest.mark.parametrize("profile", SLURM_PROFILES)
def test_slurm_profile_keys_exist_in_the_launcher_schema(profile):
    schema = {f.name for f in dataclasses.fields(SlurmQueueConf)}
    keys = set(yaml.safe_load((LAUNCHERS / f"{profile}.yaml").read_text())) - {"defaults"}
    assert keys <= schema, f"not in hydra-submitit-launcher's SlurmQueueConf: {keys - schema}"
    cfg = launcher_config(profile, {"SLURM_PARTITION": "gpu", "SLURM_ACCOUNT": "proj"})
    assert cfg["_target_"].endswith("SlurmLauncher")
    assert (cfg["partition"], cfg["account"]) == ("gpu", "proj")
    assert cfg["max_num_timeout"] > 0 and cfg["signal_delay_s"] >= 60
    # one task per GPU: srun-launched DDP reads its rank from the SLURM variables
    assert cfg["tasks_per_node"] == cfg["gpus_per_node"]


def test_multi_gpu_profiles_request_their_shape_and_default_to_no_partition(monkeypatch):
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    shapes = {p: launcher_config(p) for p in SLURM_PROFILES}
    assert {p: (c["nodes"], c["gpus_per_node"]) for p, c in shapes.items()} == {
        "slurm": (1, 1),
        "slurm_gpu4": (1, 4),
        "slurm_multinode": (2, 4),
    }
    assert all(c["partition"] is None and c["account"] is None for c in shapes.values())
    for cfg in shapes.values():
        setup = " ".join(cfg["setup"])
        assert "MASTER_ADDR" in setup and "MASTER_PORT" in setup and "SRUN_CPUS_PER_TASK" in setup


@pytest.fixture(scope="module")
def cluster():
    """A real single-node cluster for this module, or a skip that says why there is none."""
    try:
        c = start_cluster()
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM cluster here: {exc}")
    try:
        yield c
    finally:
        c.stop()


def submit(cluster: SlurmCluster, out_dir: Path, name: str, *train_args: str) -> tuple[str, Path]:
    """``sbatch OPTIONS slurm/train.sbatch TRAIN_ARGS`` from the repository root.

    The command-line options fit the script's GPU defaults (4 tasks, 4 GPUs) to the CPU-only
    test node. Returns the job id and its output file.
    """
    options = [
        f"--partition={cluster.partition}",
        f"--job-name={name}",
        "--gpus-per-node=0",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--mem=1G",
        "--time=5",
        f"--output={out_dir}/slurm-%x-%j.out",
    ]
    # the job runs this interpreter (whichever environment the tests run in)
    env = {"SHINE_PYTHON": sys.executable}
    job_id = cluster.sbatch(*options, str(SBATCH_SCRIPT), *train_args, cwd=ROOT, env=env)
    return job_id, out_dir / f"slurm-{name}-{job_id}.out"


def read(output: Path) -> str:
    return output.read_text() if output.exists() else "(no output file)"


def finish(cluster: SlurmCluster, job_id: str, output: Path, timeout: float = 120.0) -> str:
    """Wait for the job; fail with its output and the cluster's state unless it COMPLETED."""
    state = cluster.wait_job(job_id, timeout=timeout)
    assert state == "COMPLETED", f"job {job_id}: {state}\n{read(output)}\n{cluster.diagnostics()}"
    return read(output)


def wait_until(
    ready: Callable[[], bool], cluster: SlurmCluster, job_id: str, output: Path, what: str
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ready():
            return
        if cluster.job_state(job_id) in FINAL_STATES:
            break
        time.sleep(0.05)
    pytest.fail(f"job {job_id}: {what} never happened\n{read(output)}\n{cluster.diagnostics()}")


def steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.slow
def test_cluster_runs_a_job_step(cluster):
    proc = cluster.run("srun", f"--partition={cluster.partition}", "hostname", timeout=60)
    assert proc.stdout.strip() == cluster.node


@pytest.mark.slow
@pytest.mark.parametrize("profile", SLURM_PROFILES)
def test_profile_setup_exports_the_rendezvous_in_a_job(cluster, profile):
    """The ``setup`` lines submitit puts before ``srun``, run inside a real allocation."""
    setup = launcher_config(profile)["setup"]
    script = "\n".join(
        [*setup, 'echo "$MASTER_ADDR $MASTER_PORT $SLURM_JOB_ID $SRUN_CPUS_PER_TASK"']
    )
    proc = cluster.run(
        "srun", f"--partition={cluster.partition}", "--cpus-per-task=1", "bash", "-c", script
    )
    addr, port, job_id, cpus = proc.stdout.split()
    assert addr == cluster.node
    assert int(port) == 15000 + int(job_id) % 20000
    assert cpus == "1"


@pytest.mark.slow
def test_sbatch_script_runs_a_tiny_experiment(cluster, tmp_path):
    job_id, output = submit(
        cluster, tmp_path, "tiny", *EXPERIMENT, "method.max_iter=3", f"paths.log_dir={tmp_path}"
    )
    text = finish(cluster, job_id, output)
    run = tmp_path / "breast_cancer_shine" / "method.max_iter=3" / "seed=0"
    assert (run / "summary.json").exists(), text
    assert steps(run) == [0, 1, 2, 3]
    # the DDP rendezvous is exported from the allocation's first host
    assert f"MASTER_ADDR={cluster.node} MASTER_PORT=" in text, text
    assert "srun ended with status 0" in text, text


@pytest.mark.slow
def test_submitit_launcher_runs_a_sweep_on_slurm(cluster, tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "--multirun",
        *EXPERIMENT,
        "method.max_iter=2",
        "seed=0,1",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=5",
        f"hydra.launcher.partition={cluster.partition}",
        f"paths.log_dir={tmp_path}",
        "sweep_name=slurm_smoke",
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=150
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the sweep did not finish: {exc.stdout}{exc.stderr}\n{cluster.diagnostics()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr + cluster.diagnostics()
    sweep = tmp_path / "sweeps" / "slurm_smoke"
    runs = sorted(p.parent for p in sweep.glob("breast_cancer_shine/*/seed=*/summary.json"))
    assert [OmegaConf.load(run / "config.yaml").seed for run in runs] == [0, 1], proc.stderr
    assert all(steps(run) == [0, 1, 2] for run in runs)
    # the jobs went through sbatch: submitit's job script and logs are in the sweep directory
    assert list(sweep.glob(".submitit/*/*_submission.sh")), sorted(sweep.rglob("*"))


@pytest.mark.slow
def test_second_submission_resumes_an_interrupted_run(cluster, tmp_path):
    common = (*EXPERIMENT, "method.max_iter=4", f"paths.log_dir={tmp_path}")
    run = tmp_path / "breast_cancer_shine" / "method.max_iter=4" / "seed=0"  # stop_after: neutral
    job_id, output = submit(cluster, tmp_path, "part1", *common, "task.trainer.stop_after=2")
    finish(cluster, job_id, output)
    assert not (run / "summary.json").exists()
    assert (run / "checkpoints" / "last.pt").exists()
    assert steps(run) == [0, 1, 2]

    job_id, output = submit(cluster, tmp_path, "part2", *common)
    text = finish(cluster, job_id, output)
    assert (run / "summary.json").exists(), text
    assert steps(run) == [0, 1, 2, 3, 4]
    assert "resuming run" in (run / "train.log").read_text()


@pytest.mark.slow
def test_time_limit_signal_requeues_the_job_which_resumes(cluster, tmp_path):
    """USR1 (what SLURM sends 120 s before the time limit) makes the script requeue its job."""
    max_iter = 400  # 3-8 s of outer steps: the signal arrives mid-run
    run = tmp_path / "breast_cancer_shine" / f"method.max_iter={max_iter}" / "seed=0"
    job_id, output = submit(
        cluster,
        tmp_path,
        "requeue",
        *EXPERIMENT,
        f"method.max_iter={max_iter}",
        f"paths.log_dir={tmp_path}",
    )
    checkpoint = run / "checkpoints" / "last.pt"
    wait_until(checkpoint.exists, cluster, job_id, output, "a first checkpoint")
    assert not (run / "summary.json").exists(), "the run ended before the signal: make it longer"
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    def job_info() -> str:
        return cluster.run("scontrol", "show", "job", job_id).stdout

    def requeued() -> bool:
        info = job_info()
        return "Restarts=1" in info and not re.search(r"JobState=(REQUEUED|COMPLETING)\b", info)

    wait_until(requeued, cluster, job_id, output, "the requeue")
    if re.search(r"JobState=PENDING Reason=BeginTime\b", job_info()):
        # SLURM holds a requeued job for ~2 minutes while the node cleans up. Release it sooner:
        # once the node is idle and the clock has left the second of the requeue (slurmd refuses
        # credentials issued in the second their job was revoked).
        wait_until(lambda: cluster.node_state() == "idle", cluster, job_id, output, "idle node")
        time.sleep(2)
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    text = finish(cluster, job_id, output)
    assert "caught USR1" in text and f"requeueing job {job_id}" in text, text
    assert f"job {job_id} (restart 1)" in text, text
    assert (run / "summary.json").exists(), text
    # resumed from the checkpoint: every step once, none repeated or lost
    assert steps(run) == list(range(max_iter + 1))
    assert "resuming run" in (run / "train.log").read_text()
