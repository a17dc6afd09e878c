"""Every config composes, and every solver / backward / experiment task instantiates."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
SOLVERS = sorted(p.stem for p in (CONFIGS / "solver").glob("*.yaml"))
BACKWARDS = sorted(p.stem for p in (CONFIGS / "backward").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml") if p.stem != "none")
#: the methods of each half of the paper: configs/method/impl/<setting>/<method>.yaml
IMPLEMENTED = {
    setting: sorted(
        p.stem
        for p in (CONFIGS / "method" / "impl" / setting).glob("*.yaml")
        if p.stem != "outer_loop"
    )
    for setting in ("deq", "bilevel")
}
#: the experiments that run one method (the others compare methods inside their task)
METHOD_EXPERIMENTS = {
    "deq": ["cifar", "digits", "imagenet"],
    "bilevel": [
        "breast_cancer",
        "news20",
        "real_sim",
        "synthetic_news",
        "synthetic_news_small",
        "nls_breast_cancer",
        "nls_news20",
        "nls_synthetic_news_small",
    ],
}
#: the searches have no outer loop for the NLS experiments' HOAG settings (max_iter, tolerance)
SEARCHES = {"grid_search", "random_search"}
EXPERIMENT_METHODS = [
    (experiment, method)
    for setting, experiments in METHOD_EXPERIMENTS.items()
    for experiment in experiments
    for method in IMPLEMENTED[setting]
    if not (experiment.startswith("nls_") and method in SEARCHES)
]
#: thin aliases kept for the design card's commands: alias -> (experiment, method)
ALIASES = {"cifar_shine": ("cifar", "shine")}
STUDIES = sorted(
    set(EXPERIMENTS) - {e for es in METHOD_EXPERIMENTS.values() for e in es} - set(ALIASES)
)


def compose_train(overrides: list[str], *, hydra_node: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_node)


def _targets(node) -> list[str]:
    if isinstance(node, DictConfig):
        found = [str(node["_target_"])] if node.get("_target_") else []
        return found + [t for key in node if key != "_target_" for t in _targets(node[key])]
    if isinstance(node, ListConfig):
        return [t for item in node for t in _targets(item)]
    return []


def _locate(target: str) -> object:
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but imports something missing
                raise
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(target)


def test_groups_are_not_empty():
    assert EXPERIMENTS and SOLVERS and BACKWARDS and METHODS and STUDIES
    assert set(EXPERIMENTS) >= {e for es in METHOD_EXPERIMENTS.values() for e in es}


def test_every_method_names_an_implementation_and_back():
    # a method file (configs/method/NAME.yaml) exists for every implementation, and every method
    # file has at least one implementation
    implemented = {m for ms in IMPLEMENTED.values() for m in ms}
    assert implemented == set(METHODS)
    # the paper's shared names mean one idea in both halves
    assert {"shine", "shine_refine", "shine_opa", "jacobian_free"} <= set(IMPLEMENTED["deq"])
    assert {"shine", "shine_refine", "shine_opa", "jacobian_free"} <= set(IMPLEMENTED["bilevel"])
    for method in METHODS:
        text = (CONFIGS / "method" / f"{method}.yaml").read_text()
        assert f"name: {method}\n" in text and "impl@_here_: ${setting}/" in text


def _check_header(experiment: str) -> None:
    text = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "Command:" in text and "Cost:" in text, "header must give the command and its cost"


def _resolves(cfg: DictConfig) -> None:
    # everything but the hydra-runtime output dir resolves outside of a Hydra run
    cfg.paths.output_dir = "unused"
    OmegaConf.resolve(cfg)


@pytest.mark.parametrize(("experiment", "method"), EXPERIMENT_METHODS)
def test_experiment_with_each_method_composes_and_instantiates(experiment, method):
    cfg = compose_train([f"+experiment={experiment}", f"method={method}"])
    # the one method choice names the run, the summary's method and the method object
    assert cfg.experiment_name == f"{experiment}_{method}"
    assert cfg.task.method_name == method and cfg.method.name == method
    _resolves(cfg)
    _check_header(experiment)
    # groups the experiment does not use are not composed
    assert "solver" not in cfg and "backward" not in cfg
    if cfg.setting.name == "deq":
        assert cfg.task.solver == cfg.method.solver and cfg.task.backward == cfg.method.backward
    else:
        assert cfg.task.method == cfg.method
    task = instantiate(cfg.task)
    assert callable(getattr(task, "run", None))


@pytest.mark.parametrize("experiment", STUDIES)
def test_study_composes_and_instantiates(experiment):
    cfg = compose_train([f"+experiment={experiment}"])
    assert cfg.experiment_name == experiment
    assert cfg.task is not None, "an experiment must select a task"
    _resolves(cfg)
    _check_header(experiment)
    assert "backward" not in cfg, "the studies take their backward strategies inside the task"
    task = instantiate(cfg.task)
    assert callable(getattr(task, "run", None))


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_is_the_experiment_with_its_method(alias):
    experiment, method = ALIASES[alias]
    a = compose_train([f"+experiment={alias}", "seed=2"], hydra_node=True)
    b = compose_train([f"+experiment={experiment}", f"method={method}", "seed=2"], hydra_node=True)
    assert a.experiment_name == b.experiment_name == f"{experiment}_{method}"
    for cfg in (a, b):
        del cfg.hydra
    assert a == b
    # another method on the command line replaces the alias' one
    other = compose_train([f"+experiment={alias}", "method=jacobian_free"])
    assert other.method.name == "jacobian_free" and other.experiment_name == "cifar_jacobian_free"


@pytest.mark.parametrize(
    ("experiment", "method", "setting"),
    [("digits", "hoag", "deq"), ("breast_cancer", "original", "bilevel")],
)
def test_a_method_of_the_other_half_is_an_error_naming_the_implementations(
    experiment, method, setting
):
    with pytest.raises(Exception, match=f"method/impl/{setting}/{method}"):
        compose_train([f"+experiment={experiment}", f"method={method}"])


@pytest.mark.parametrize(
    ("experiment", "override", "used"),
    [
        # the DEQ methods compose the solver and backward groups under method.*: Hydra names them
        ("digits", "solver=anderson", "solver@method.solver"),
        ("digits", "backward=shine_refine", "backward@method.backward"),
        # the bi-level methods' inner solver
        ("breast_cancer", "solver=lbfgs_opa", "solver@method.solver"),
    ],
)
def test_overriding_a_group_the_experiment_does_not_use_names_the_one_used(
    experiment, override, used
):
    with pytest.raises(Exception, match=used.replace(".", r"\.")):
        compose_train([f"+experiment={experiment}", "method=shine", override])
    # the named group is the one to override
    key, value = override.split("=")
    cfg = compose_train([f"+experiment={experiment}", "method=shine", f"{used}={value}"])
    assert cfg.method[key]._target_ == compose_train([f"+{key}={value}"])[key]._target_


def test_deq_methods_take_the_forward_budget_from_the_trainer():
    for method in IMPLEMENTED["deq"]:
        cfg = compose_train(["+experiment=digits", f"method={method}"])
        solver = cfg.method.solver
        assert (solver.max_iter, solver.memory, solver.tol) == (12, 12, 1e-3), method
    refine = compose_train(["+experiment=digits", "method=shine_refine", "n_backward=10"])
    assert refine.task.backward.n_steps == 10
    limited = compose_train(["+experiment=digits", "method=original_limited", "n_backward=2"])
    assert limited.task.backward.max_iter == 2
    original = compose_train(["+experiment=digits", "method=original"])
    assert original.task.backward.max_iter == original.trainer.b_thres


def test_shared_names_mean_the_same_idea_in_both_halves():
    deq = compose_train(["+experiment=digits", "method=shine_opa"]).method
    bilevel = compose_train(["+experiment=breast_cancer", "method=shine_opa"]).method
    assert deq.solver._target_ == "shine.solvers.AdjointBroyden" and deq.solver.opa_every == 5
    assert bilevel.solver._target_ == "shine.solvers.LBFGS" and bilevel.solver.opa_every == 5
    for cfg in (deq, bilevel):
        assert "Shine" in str(OmegaConf.to_container(cfg.backward))


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_instantiates(solver):
    cfg = compose_train([f"+solver={solver}"])
    obj = instantiate(cfg.solver)
    assert callable(obj)
    for key, value in cfg.solver.items():
        if key not in ("_target_",):
            assert getattr(obj, key) == value, f"{solver}.{key} not passed through"


@pytest.mark.parametrize("backward", BACKWARDS)
def test_backward_instantiates(backward):
    cfg = compose_train([f"+backward={backward}"])
    obj = instantiate(cfg.backward)
    assert callable(obj)


def test_inheriting_configs_only_change_their_deltas():
    opa = compose_train(["+solver=lbfgs_opa"]).solver
    base = compose_train(["+solver=lbfgs"]).solver
    assert opa.opa_every == 5 and base.opa_every is None
    assert {k for k in base if base[k] != opa[k]} == {"opa_every"}
    assert compose_train(["+backward=ift_limited"]).backward.max_iter == 5
    assert compose_train(["+backward=cg"]).backward.solver._target_.endswith("GradientAdjoint")
    # the bi-level outer loop's L-BFGS is configs/solver/lbfgs.yaml plus the authors' settings
    hoag = compose_train(["+experiment=breast_cancer", "method=hoag"]).method.solver
    assert {k for k in base if base[k] != hoag[k]} == {"scale_gamma", "opa_normalize"}


def test_command_line_wins_over_experiment():
    cfg = compose_train(["+experiment=opa_inversion", "solver.memory=7", "task.n_seeds=2"])
    assert cfg.solver.memory == 7 and cfg.task.n_seeds == 2
    assert cfg.task.solver.memory == 7, "the task must receive the composed solver"


def test_opa_inversion_has_the_authors_settings():
    cfg = compose_train(["+experiment=opa_inversion"])
    assert cfg.solver._target_ == "shine.solvers.LBFGS"
    assert (cfg.solver.memory, cfg.solver.tol, cfg.solver.max_iter) == (60, 1e-6, 1000)
    assert cfg.solver.opa_every == 5
    assert cfg.task.n_seeds == 100 and cfg.task.log_lambda == 0.0
    assert cfg.dataset.keep_fraction == 0.2 and cfg.dataset.random_state == 3


def test_run_and_sweep_directories_are_deterministic(monkeypatch, tmp_path):
    monkeypatch.setenv("SHINE_RUNS", str(tmp_path))
    cfg = compose_train(["+experiment=opa_inversion", "seed=3"], hydra_node=True)
    assert Path(cfg.hydra.run.dir) == tmp_path / "opa_inversion" / "seed=3"
    assert cfg.hydra.sweep.dir == f"{tmp_path}/sweeps/adhoc"
    excluded = cfg.hydra.job.config.override_dirname.exclude_keys
    assert {"experiment", "sweep", "hydra/launcher", "seed"} <= set(excluded)
    assert cfg.hydra.output_subdir is None


def test_run_directory_is_named_by_what_the_run_computes(tmp_path):
    # the same experiment and seed with another method, solver setting or number of epochs is
    # another run; result-neutral overrides (logger, threads, checkpoint interval) are not
    base = ["+experiment=digits", "seed=1", f"paths.log_dir={tmp_path}"]
    dirs = {}
    for name, extra in {
        "plain": ["method=shine"],
        "other_method": ["method=shine_refine"],
        "other_solver": ["method=shine", "method.solver.h0=-0.5"],
        "epochs": ["method=shine", "trainer.epochs=3"],
        "neutral": [
            "method=shine",
            "logger=wandb",
            "trainer.num_threads=2",
            "trainer.checkpoint_every=5",
        ],
    }.items():
        proc = subprocess.run(
            [sys.executable, "train.py", *base, *extra, "--cfg", "all", "--resolve"]
            + ["-p", "hydra.run.dir"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        dirs[name] = Path(proc.stdout.strip())
    assert dirs["plain"] == tmp_path / "digits_shine" / "seed=1"
    assert dirs["other_method"] == tmp_path / "digits_shine_refine" / "seed=1"
    assert dirs["other_solver"] == tmp_path / "digits_shine" / "method.solver.h0=-0.5" / "seed=1"
    assert dirs["epochs"] == tmp_path / "digits_shine" / "trainer.epochs=3" / "seed=1"
    assert dirs["neutral"] == dirs["plain"]


def test_excluded_overrides_are_the_result_neutral_keys():
    from shine.harness.runtime.run_dir import RESULT_NEUTRAL_KEYS

    excluded = set(
        compose_train([], hydra_node=True).hydra.job.config.override_dirname.exclude_keys
    )
    # the method is in the path too: <experiment>_<method>, or the bi-level sweeps' method folder
    in_the_path = {"experiment", "sweep", "seed", "hydra/launcher", "method"}
    for key in excluded - in_the_path:
        group = key.split("/")[0]
        assert any(
            key == k or key.startswith(k + ".") or group == k for k in RESULT_NEUTRAL_KEYS
        ), f"{key} is left out of run directory names but not result-neutral on resume"


def test_paths_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHINE_RUNS", str(tmp_path / "r"))
    monkeypatch.setenv("SHINE_DATA", str(tmp_path / "d"))
    cfg = compose_train([])
    assert cfg.paths.log_dir == str(tmp_path / "r") and cfg.paths.data_dir == str(tmp_path / "d")
    monkeypatch.delenv("SHINE_RUNS")
    monkeypatch.delenv("SHINE_DATA")
    cfg = compose_train([])
    assert (cfg.paths.log_dir, cfg.paths.data_dir) == ("runs", "data")


@pytest.mark.parametrize(
    ("launcher", "target"), [("local", "LocalLauncher"), ("slurm", "SlurmLauncher")]
)
def test_launchers_compose(launcher, target, monkeypatch):
    monkeypatch.setenv("SLURM_PARTITION", "testpart")
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    cfg = compose_train([f"hydra/launcher={launcher}"], hydra_node=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.partition == "testpart"
        assert cfg.hydra.launcher.account is None
        assert cfg.hydra.launcher.max_num_timeout > 0


def test_wandb_logger_is_offline_by_default():
    mirror = instantiate(compose_train(["logger=wandb"]).logger.mirror)
    assert mirror.mode == "offline"
    assert instantiate(compose_train([]).logger.mirror).mode == "disabled"


def test_default_config_has_no_task_and_no_experiment_entry():
    cfg = compose_train([])
    assert cfg.get("task") is None and "experiment" not in cfg
    assert cfg.overwrite is False and cfg.seed == 0


@pytest.mark.parametrize(
    ("overrides", "memory"),
    [
        # Figs. 1 / E.1: the authors' Fortran L-BFGS-B restarted its memory every outer step
        (["+sweep=fig1", "method=shine"], "restart"),
        (["+experiment=news20", "method=shine"], "restart"),
        # Figs. 2 left / E.2: their pure-Python L-BFGS kept it
        (["+sweep=fig2_left", "method=shine_opa"], "keep"),
        (["+sweep=fig_e2", "method=hoag"], "keep"),
        (["+experiment=nls_news20", "method=shine"], "keep"),
    ],
)
def test_inner_memory_follows_the_authors_solver_of_each_figure(overrides, memory):
    assert compose_train(overrides).method.inner_memory == memory


def test_bilevel_sweeps_accept_method_overrides():
    # Hydra composes a sweep once before the swept method is chosen: the sweep files select one
    # so that method.* keys exist for the command line
    cfg = compose_train(["+sweep=fig1", "method.mode=robust", "method.inner_memory=shift"])
    assert (cfg.method.mode, cfg.method.inner_memory) == ("robust", "shift")


def test_solver_config_comment_says_what_inverse_at_does():
    # select_estimate: "lowest" is H_k at the returned iterate z_k, "before_lowest" H_{k-1}
    from shine.solvers.broyden import select_estimate

    assert '"lowest"``: ``H_k`` at the returned' in select_estimate.__doc__
    line = next(
        line
        for line in (CONFIGS / "solver" / "broyden.yaml").read_text().splitlines()
        if line.startswith("inverse_at:")
    )
    value, comment = line.split("#", 1)
    assert value.split(":")[1].strip() == "lowest"
    assert comment.strip().startswith("H_k at the returned")
    assert "before_lowest: H_{k-1}" in comment
