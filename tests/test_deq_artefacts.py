"""DEQ artefacts: timing / contractivity / inversion tasks, their collection, figures and tables.

Fast tests run every task on the tiny MDEQ with a few small batches, check the measurements
against known answers (power iteration on linear maps, the authors' "nonlinear spectral radius"
of a normalising map, OPA vs Jacobian-Free on a contractive DEQ) and run the collection, figure
and table scripts on fixture run directories. The ``slow`` test runs everything through
``train.py`` (a Fig. 3 sweep included).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from script_modules import load_script
from test_mdeq import make_contractive

from shine.analysis import deq_results
from shine.backward import IFT, JacobianFree, Refine, Shine
from shine.data import SyntheticImages
from shine.harness.runtime import RunDirectory
from shine.harness.tasks.deq_common import (
    load_weights,
    resolve_checkpoint,
    resumable,
    resume_index,
)
from shine.harness.tasks.deq_contractivity import (
    DEQContractivity,
    jvp_at,
    nonlinear_power_value,
    spectral_norm,
    spectral_radius,
    vjp_at,
)
from shine.harness.tasks.deq_inversion import DEQInversion
from shine.harness.tasks.deq_timing import DEQTiming
from shine.models import MDEQClassifier, MDEQConfig
from shine.solvers import AdjointBroyden, Broyden

ROOT = Path(__file__).resolve().parents[1]
collect = load_script("collect")
fig_deq = load_script("fig_deq")
tables_deq = load_script("tables_deq")

DT = torch.float64
TINY = MDEQConfig.tiny(image_size=8, in_channels=1)
DATA = SyntheticImages(n_train=48, n_test=12, image_shape=(1, 8, 8))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two OpenMP threads make every op of the
    tiny MDEQ up to ~100x slower (they wait for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def start(path: Path) -> RunDirectory:
    run_dir = RunDirectory(path)
    run_dir.start("config: test\n")
    return run_dir


def save_model(path: Path, model) -> Path:
    """A run directory whose checkpoint holds ``model`` as the trainer writes it."""
    run_dir = start(path)
    run_dir.save_checkpoint({"stepper": {"model": model.state_dict()}, "time": 0.0}, step=7)
    return path


# ----------------------------------------------------------------------- measurements


def _batched_matrices(batch=3, dim=10, seed=0):
    """Non-symmetric matrices with known spectral radius: A = Q diag(λ) Q^{-1}, plus one whose
    dominant eigenvalues are a complex pair r·e^{±iθ} (a scaled rotation block)."""
    gen = torch.Generator().manual_seed(seed)
    mats, radii = [], []
    for b in range(batch):
        lam = torch.linspace(0.1, 0.6, dim, dtype=DT)
        lam[-1] = 0.8 + 0.3 * b  # dominant, separated
        Q = torch.randn(dim, dim, dtype=DT, generator=gen) + 3 * torch.eye(dim, dtype=DT)
        mats.append(Q @ torch.diag(lam) @ torch.linalg.inv(Q))
        radii.append(float(lam[-1]))
    r, th = 0.9, 0.7
    M = torch.diag(torch.linspace(0.1, 0.5, dim, dtype=DT))
    M[:2, :2] = r * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    Q = torch.randn(dim, dim, dtype=DT, generator=gen) + 3 * torch.eye(dim, dtype=DT)
    mats.append(Q @ M @ torch.linalg.inv(Q))
    radii.append(r)
    return torch.stack(mats), torch.tensor(radii, dtype=DT)


def test_power_iteration_recovers_the_spectral_radius_of_linear_maps():
    A, radii = _batched_matrices()
    eig = torch.linalg.eigvals(A).abs().max(-1).values
    assert torch.allclose(eig, radii, rtol=1e-6)

    def fn(z):  # one linear map per sample
        return torch.einsum("bij,bj->bi", A, z)

    v0 = torch.randn(A.shape[0], A.shape[1], dtype=DT, generator=torch.Generator().manual_seed(1))
    z = torch.zeros_like(v0)
    rho, _ = spectral_radius(jvp_at(fn, z), v0, n_iter=300)
    assert torch.allclose(rho[:-1], radii[:-1], rtol=1e-4), (rho, radii)
    # complex dominant pair: the ratio oscillates, its geometric mean still converges
    assert float(rho[-1]) == pytest.approx(float(radii[-1]), rel=5e-3)
    sigma = spectral_norm(jvp_at(fn, z), vjp_at(fn, z), v0, n_iter=300)
    assert torch.allclose(sigma, torch.linalg.matrix_norm(A, 2), rtol=1e-6)
    # the authors' "nonlinear" power method is the plain power method on a linear map
    value = nonlinear_power_value(fn, v0, n_iter=300)
    assert torch.allclose(value[:-1], radii[:-1], rtol=1e-6)


def test_nonlinear_power_value_is_the_output_norm_of_a_normalising_map():
    """§4.2: with f ending in a normalisation, the value is ‖f‖ whatever its Jacobian."""
    gen = torch.Generator().manual_seed(0)
    dim, c = 12, 7.5
    W = 0.03 * torch.randn(dim, dim, dtype=DT, generator=gen) / math.sqrt(dim)
    x = torch.randn(4, dim, dtype=DT, generator=gen)

    def fn(z):  # c · standardised(W z + x): output norm c·sqrt(dim), a contraction
        h = z @ W.T + x
        return c * (h - h.mean(-1, keepdim=True)) / h.std(-1, unbiased=False, keepdim=True)

    z0 = torch.randn(4, dim, dtype=DT, generator=gen)
    value = nonlinear_power_value(fn, z0, n_iter=20)
    assert torch.allclose(value, torch.full_like(value, c * math.sqrt(dim)), rtol=1e-12)
    z = torch.zeros_like(x)
    for _ in range(200):
        z = fn(z)
    rho, _ = spectral_radius(jvp_at(fn, z), z0, n_iter=100)
    assert float(rho.max()) < 1.0 < float(value.min())  # contractive, yet "radius" 26


def _contractivity_task(solver, checkpoint, method_name, n_images, iters):
    """Contractivity of the tiny MDEQ in batches of 4; ``iters``: nonlinear, power, norm."""
    n_nonlinear, n_power, n_norm = iters
    return DEQContractivity(
        data=DATA,
        model=TINY,
        solver=solver,
        backward=Shine(),
        checkpoint=checkpoint,
        method_name=method_name,
        n_images=n_images,
        batch_size=4,
        n_iter_nonlinear=n_nonlinear,
        n_iter_power=n_power,
        n_iter_norm=n_norm,
    )


def test_nonlinear_value_of_the_mdeq_is_sqrt_d_at_initialisation(tmp_path):
    """The MDEQ's f ends in GroupNorm (gain 1): the authors' value is √d, not a radius."""
    solver = Broyden(max_iter=6, tol=1e-3, memory=6)
    task = _contractivity_task(solver, None, "init", n_images=8, iters=(10, 8, 3))
    run_dir = start(tmp_path / "c")
    summary = task.run(run_dir)
    d = TINY.state_dim
    assert summary["nonlinear_spectral_radius"] == pytest.approx(math.sqrt(d), rel=1e-3)
    assert summary["n_images"] == 8 and summary["state_dim"] == d
    for key in ("spectral_radius", "spectral_norm", "contractive_frac", "eq_residual_rel_median"):
        assert math.isfinite(summary[key]), key
    records = run_dir.read_metrics()
    assert len(records) == 2 and len(records[0]["spectral_radius"]) == 4
    assert {"nonlinear", "spectral_norm", "eq_residual_rel", "method"} <= set(records[0])


def test_contractivity_of_a_contractive_mdeq_loads_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MDEQClassifier(TINY, Broyden(max_iter=20, tol=1e-8, memory=20), Shine())
    make_contractive(model.f, 0.5)
    run = save_model(tmp_path / "trained", model)
    solver = Broyden(max_iter=20, tol=1e-6, memory=20)
    task = _contractivity_task(solver, str(run), "shine", n_images=4, iters=(5, 30, 0))
    summary = task.run(start(tmp_path / "c"))
    assert (
        summary["checkpoint"].endswith("checkpoints/last.pt") and summary["checkpoint_step"] == 7
    )
    assert summary["contractive_frac"] == 1.0 and summary["spectral_radius"] < 0.9
    assert summary["eq_residual_rel_median"] < 1e-4
    assert "spectral_norm" not in summary


def test_load_weights_and_missing_checkpoint(tmp_path):
    torch.manual_seed(3)
    a = MDEQClassifier(TINY, Broyden(), Shine())
    torch.manual_seed(4)
    b = MDEQClassifier(TINY, Broyden(), Shine())
    run = save_model(tmp_path / "run", a)
    info = load_weights(b, run)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert info["checkpoint_step"] == 7
    torch.save(a.state_dict(), tmp_path / "bare.pt")  # a bare state dict works too
    assert load_weights(b, tmp_path / "bare.pt")["checkpoint_step"] == -1
    with pytest.raises(FileNotFoundError, match="checkpoint=null"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_resumable_checkpoints_each_item_and_resumes_after_the_last_done(tmp_path):
    run_dir = start(tmp_path / "r")
    for index, item in resumable(run_dir, "abcd", "next", steps_per_item=2):
        run_dir.log_metrics(2 * index + 2, {"item": item})  # item k owns steps 2k+1, 2k+2
        if item == "b":
            break  # interrupted while handling "b": its checkpoint is not written
    assert resume_index(run_dir, "next") == 1 and run_dir.load_checkpoint() == {"next": 1}
    resumed = RunDirectory(tmp_path / "r")
    resumed.start("config: test\n")  # drops the record of "b" (step 4 > checkpointed step 2)
    assert [r["item"] for r in resumed.read_metrics()] == ["a"]
    rest = [(index, item) for index, item in resumable(resumed, "abcd", "next", steps_per_item=2)]
    assert rest == [(1, "b"), (2, "c"), (3, "d")] and resume_index(resumed, "next") == 4


def test_timing_task_records_and_summary(tmp_path):
    torch.manual_seed(0)
    trained = save_model(tmp_path / "trained", MDEQClassifier(TINY, Broyden(), Shine()))
    task = DEQTiming(
        data=DATA,
        model=TINY,
        solver=Broyden(max_iter=6, tol=1e-3, memory=6),
        backwards={
            "original": IFT(max_iter=6, tol=1e-8),
            "shine": Shine(),
            "shine_refine": Refine(Shine(), n_steps=2),
        },
        checkpoint={"shine": str(trained)},  # the others: random initialisation
        n_batches=2,
        batch_size=8,
        warmup=1,
    )
    run_dir = start(tmp_path / "t")
    summary = task.run(run_dir)
    records = run_dir.read_metrics()
    assert [r["method"] for r in records] == ["original"] * 2 + ["shine"] * 2 + [
        "shine_refine"
    ] * 2
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"forward_ms", "backward_ms", "implicit_ms", "fwd_nstep", "bwd_n_vjps"} <= set(r)
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0
    assert records[2]["checkpoint"].endswith("last.pt") and "checkpoint" not in records[0]
    assert summary["methods"] == ["original", "shine", "shine_refine"]
    for m in summary["methods"]:
        for key in ("median_forward_ms", "median_backward_ms", "median_implicit_ms", "n_batches"):
            assert f"{m}/{key}" in summary
    # the iterative backward costs VJPs, SHINE none
    assert records[0]["bwd_n_vjps"] >= 6 and records[2]["bwd_n_vjps"] == 0
    assert summary["original/median_implicit_ms"] > summary["shine/median_implicit_ms"]


def _inversion_task(**kw):
    solvers = {
        "broyden": Broyden(max_iter=12, tol=1e-10, memory=12),
        "adjoint_broyden": AdjointBroyden(max_iter=12, tol=1e-10, memory=12),
        "adjoint_broyden_opa": AdjointBroyden(max_iter=12, tol=1e-10, memory=12, opa_every=5),
    }
    return DEQInversion(
        data=DATA,
        model=TINY,
        solvers=solvers,
        exact=IFT(max_iter=40, tol=1e-11),
        **{"n_batches": 1, "batch_size": 4, **kw},
    )


def test_inversion_task_records_and_summary(tmp_path):
    task = _inversion_task(n_batches=2, dtype="float32")
    run_dir = start(tmp_path / "i")
    summary = task.run(run_dir)
    records = run_dir.read_metrics()
    assert len(records) == 8 and [r["step"] for r in records] == [1] * 4 + [2] * 4
    assert [r["method"] for r in records[:4]] == list(task.methods)
    for r in records:
        for key in ("cos", "norm_ratio", "cos_sample_mean", "fwd_nstep", "exact_residual_max"):
            assert math.isfinite(r[key]), key
    # Jacobian-Free and SHINE (Broyden) share one forward solve; only OPA makes extra updates
    assert records[0]["fwd_nstep"] == records[1]["fwd_nstep"]
    assert records[3]["opa_updates"] > 0 and records[2]["opa_updates"] == 0
    for m in task.methods:
        assert {f"{m}/cos_median", f"{m}/norm_ratio_median", f"{m}/n_batches"} <= set(summary)
    with pytest.raises(ValueError, match="unknown method"):
        _inversion_task(methods=["nope"])


@pytest.mark.parametrize("seed", [0, 1])
def test_opa_inverts_better_than_jacobian_free_on_a_contractive_deq(seed):
    """Fig. E.3's claim on a small contractive MDEQ (f contracts at ~0.4-0.6): OPA along the
    true dCE/dz makes SHINE's direction nearly exact. Calibrated (float64, seeds 0-2, gains
    0.5-1): 1 - cos is 0.006-0.09 for JF and 1e-5-5e-3 for OPA; we require a 4x smaller error."""
    torch.manual_seed(seed)
    model = MDEQClassifier(TINY, Broyden(), JacobianFree(), dtype=DT)
    make_contractive(model.f, 1.0)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 8, 8, dtype=DT, generator=gen)
    y = torch.tensor([0, 3, 5, 7])
    records = {r["method"]: r for r in _inversion_task(dtype="float64").measure(model, x, y, 0)}
    jf, opa = records["jacobian_free"], records["shine_adjoint_broyden_opa"]
    assert opa["exact_residual_max"] < 1e-8
    assert opa["cos"] > 0.99 and opa["cos"] > jf["cos"]
    assert 1 - opa["cos"] < 0.25 * (1 - jf["cos"])
    assert abs(math.log(opa["norm_ratio"])) < abs(math.log(jf["norm_ratio"])) + 1e-3


# ----------------------------------------------------------------------- configs


def compose_train(overrides, hydra_node=False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_node)


@pytest.mark.parametrize("dataset", ["digits", "cifar", "imagenet"])
def test_fig3_sweeps_compose_and_set_n(dataset):
    for part, experiments in (
        ("", {"original", "jacobian_free"}),
        ("_refine", {"original_limited", "shine_refine", "jacobian_free_refine"}),
    ):
        cfg = compose_train([f"+sweep=fig3_{dataset}{part}"], hydra_node=True)
        params = cfg.hydra.sweeper.params
        assert experiments <= set(params["method"].split(","))
        subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
        assert subdir.startswith("${experiment_name}/")
    # one job of the refine sweep: the sweep file holds the experiment, the job its method
    job = compose_train([f"+sweep=fig3_{dataset}_refine", "method=shine_refine", "n_backward=2"])
    assert job.method.backward.n_steps == 2 and job.task.backward.n_steps == 2
    assert "fig3" in job.tags and job.experiment_name == f"{dataset}_shine_refine"
    limited = compose_train([f"+experiment={dataset}", "method=original_limited", "n_backward=1"])
    assert limited.task.backward.max_iter == 1
    jf_refine = compose_train([f"+experiment={dataset}", "method=jacobian_free_refine"])
    assert jf_refine.method.backward.n_steps == 5


def test_new_experiments_have_their_tags():
    for name, tag in (
        ("digits_timing", "table_e2"),
        ("cifar_timing", "table_e2"),
        ("imagenet_timing", "table_e2"),
        ("digits_contractivity", "table_e1"),
        ("cifar_contractivity", "table_e1"),
        ("digits_opa_inversion_deq", "fig_e3"),
        ("cifar_opa_inversion_deq", "fig_e3"),
    ):
        assert tag in compose_train([f"+experiment={name}"]).tags
    cfg = compose_train(["+experiment=imagenet_timing"])
    assert list(cfg.task.backwards)[2:4] == ["shine_fallback", "shine_fallback_refine"]
    for dataset in ("digits", "cifar"):
        cfg = compose_train([f"+sweep=table_e3_{dataset}"], hydra_node=True)
        assert cfg.hydra.sweeper.params["method"] == "shine_adjoint_broyden,shine_opa"
    cfg = compose_train(["+experiment=digits_contractivity", "method=shine"])
    assert cfg.task.checkpoint.endswith("digits_shine/seed=0")


# ----------------------------------------------------------------------- collection and scripts


def _train_config(dataset, method, seed, backward, tags=("deq", "fig3")):
    target = {"digits": "DigitsData", "cifar": "CIFAR10Data"}[dataset]
    data = {"_target_": f"shine.data.{target}"}
    return {
        "dataset": data,
        "backward": backward,
        "trainer": {"epochs": 4},
        "task": {
            "_target_": "shine.harness.tasks.ImageClassification",
            "data": data,
            "backward": backward,
            "method_name": method,
            "seed": seed,
        },
        "experiment_name": f"{dataset}_{method}",
        "seed": seed,
        "tags": list(tags),
    }


BACKWARDS = {
    ("original", "full"): {"_target_": "shine.backward.IFT", "max_iter": 20},
    ("original_limited", 5): {"_target_": "shine.backward.IFT", "max_iter": 5},
    ("shine", 0): {"_target_": "shine.backward.Shine"},
    ("shine_refine", 2): {
        "_target_": "shine.backward.Refine",
        "init": {"_target_": "shine.backward.Shine"},
        "n_steps": 2,
    },
    ("jacobian_free", 0): {"_target_": "shine.backward.JacobianFree"},
    ("shine_opa", 0): {
        "_target_": "shine.backward.Fallback",
        "primary": {"_target_": "shine.backward.Shine"},
    },
}
SPE = 5  # steps per epoch of the fixture runs


def make_train_run(path, dataset, method, n, seed, top1, step_time):
    """4 epochs of 5 steps, the first 7 unrolled; test top-1 after every epoch."""
    path.mkdir(parents=True)
    config = _train_config(dataset, method, seed, BACKWARDS[(method, n)])
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"step": 0, "time": 0.0, "test_top1": 10.0, "epoch": 0.0}]
    for step in range(1, 4 * SPE + 1):
        rec = {
            "step": step,
            "time": step * step_time,
            "step_time": 0.001 if step <= 7 else step_time,
            "unrolled": step <= 7,
            "epoch": step / SPE,
            "forward_time": 0.01,
        }
        if step > 7:
            rec.update(backward_time=step_time / 10, backward_total_time=step_time / 2)
        if step % SPE == 0:
            rec["test_top1"] = top1 - (4 * SPE - step) * 0.1
        records.append(rec)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({"status": "complete"}))


def make_timing_run(path, dataset, methods):
    path.mkdir(parents=True)
    backwards = {m: BACKWARDS[(m, n)] for m, n in methods}
    config = {
        "task": {
            "_target_": "shine.harness.tasks.deq_timing.DEQTiming",
            "data": {"_target_": "shine.data.DigitsData"},
            "backwards": backwards,
            "device": "cpu",
        },
        "experiment_name": f"{dataset}_timing",
        "seed": 0,
        "tags": ["deq_timing", "table_e2", dataset],
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for k, (m, _) in enumerate(methods):
        for i in range(3):
            records.append(
                {
                    "step": 3 * k + i + 1,
                    "method": m,
                    "batch": i,
                    "forward_ms": 30.0 + i,
                    "backward_ms": 10.0 * (k + 1) + i,
                    "implicit_ms": 5.0 * k,
                }
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({"device_name": "cpu"}))


def make_contractivity_run(path, method, nonlinear, rho):
    path.mkdir(parents=True)
    config = {
        "task": {
            "_target_": "shine.harness.tasks.deq_contractivity.DEQContractivity",
            "data": {"_target_": "shine.data.DigitsData"},
            "method_name": method,
        },
        "seed": 0,
        "tags": ["deq_contractivity", "table_e1", "digits"],
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("")
    summary = {
        "method": method,
        "nonlinear_spectral_radius": nonlinear,
        "spectral_radius": rho,
        "spectral_radius_max": rho * 1.2,
        "spectral_norm": 3 * rho,
        "contractive_frac": float(rho < 1),
        "n_images": 360,
        "n_iter_nonlinear": 500,
        "state_dim": 768,
    }
    (path / "summary.json").write_text(json.dumps(summary))


def make_inversion_run(path):
    path.mkdir(parents=True)
    config = {
        "task": {
            "_target_": "shine.harness.tasks.deq_inversion.DEQInversion",
            "data": {"_target_": "shine.data.DigitsData"},
        },
        "seed": 0,
        "tags": ["deq_inversion", "fig_e3", "digits"],
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    records = []
    for b in range(5):
        for k, m in enumerate(fig_deq.E3_METHODS):
            cos = 1 - 0.1 / (k + 1) * rng.uniform(0.5, 1.5)
            records.append(
                {
                    "step": b + 1,
                    "method": m,
                    "batch": b,
                    "cos": cos,
                    "norm_ratio": 1 + 0.2 / (k + 1),
                    "fwd_nstep": 12,
                }
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text("{}")


@pytest.fixture(scope="module")
def deq_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deq_runs")
    sweep = root / "sweeps" / "fig3_digits"
    for (method, n), step_time in (
        (("original", "full"), 0.2),
        (("original_limited", 5), 0.1),
        (("shine", 0), 0.05),
        (("shine_refine", 2), 0.08),
        (("jacobian_free", 0), 0.04),
        (("shine_opa", 0), 0.09),
    ):
        for seed in range(3):
            make_train_run(
                sweep / f"digits_{method}" / f"seed={seed}",
                "digits",
                method,
                n,
                seed,
                90.0 + seed,
                step_time,
            )
    # an older duplicate of one run (launched alone): the sweep's newer run wins
    make_train_run(root / "digits_shine" / "seed=0", "digits", "shine", 0, 0, 11.0, 0.05)
    old = root / "digits_shine" / "seed=0" / "summary.json"
    os.utime(old, (1e9, 1e9))
    make_timing_run(
        root / "digits_timing" / "seed=0",
        "digits",
        [("original", "full"), ("jacobian_free", 0), ("shine", 0), ("original_limited", 5)],
    )
    for method, nonlinear, rho in (("original", 27.7, 1.3), ("shine", 27.6, 0.9)):
        make_contractivity_run(root / "digits_contractivity" / method, method, nonlinear, rho)
    make_inversion_run(root / "digits_opa_inversion_deq" / "seed=0")
    return root


def test_collect_deq_rows(deq_runs, tmp_path):
    path, rows = collect.collect("fig3", [deq_runs], tmp_path)
    assert path == tmp_path / "fig3" / "runs.csv"
    assert len(rows) == 18  # 6 methods x 3 seeds, the duplicate dropped
    by = {(r["method"], r["seed"]): r for r in rows}
    assert by[("shine", 0)]["final_top1"] == 90.0  # the sweep's run, not the older 11 %
    assert by[("original", 0)]["n"] == "full" and by[("original_limited", 1)]["n"] == 5
    assert by[("shine_refine", 2)]["n"] == 2 and by[("shine_refine", 2)]["family"] == "shine"
    r = by[("original", 1)]
    assert r["epoch_time_s"] == pytest.approx(0.2 * SPE)  # equilibrium steps only
    assert r["epoch_time_all_s"] == pytest.approx(4 * SPE * 0.2 / 4)
    assert r["median_backward_ms"] == pytest.approx(100.0)  # the whole loss.backward()
    assert r["median_implicit_ms"] == pytest.approx(20.0)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:6] == ["artefact", "kind", "dataset", "method", "n", "seed"]
    _, rows = collect.collect("table_e2", [deq_runs], tmp_path)
    timing = [r for r in rows if r["kind"] == "timing"]
    assert {r["method"] for r in timing} == {
        "original",
        "jacobian_free",
        "shine",
        "original_limited",
    }
    assert len(rows) == 18 + 4
    assert len(collect.collect("table_e1", [deq_runs], tmp_path)[1]) == 2
    assert len(collect.collect("fig_e3", [deq_runs], tmp_path)[1]) == 20


def test_figures_and_tables_from_fixture_runs(deq_runs, tmp_path):
    exp, figs = tmp_path / "experiments", tmp_path / "figures"
    for name in ("fig3", "table_e2", "table_e3", "table_e1", "fig_e3"):
        collect.collect(name, [deq_runs], exp)
    paths = fig_deq.run("fig3", exp / "fig3" / "runs.csv", figs)
    assert (figs / "fig3.pdf").is_file() and (figs / "fig3.png").stat().st_size > 10_000
    summary = deq_results.read_table(exp / "fig3" / "summary.csv")
    shine = next(p for p in summary if p["family"] == "shine" and p["n"] == "0")
    assert float(shine["top1_mean"]) == pytest.approx(91.0) and shine["seeds"] == "3"
    assert {p["family"] for p in summary} == {"original", "shine", "jacobian_free"}  # no OPA
    assert len(paths) == 3
    fig_deq.run("fig_e3", exp / "fig_e3" / "runs.csv", figs)
    assert (figs / "fig_e3.png").is_file()
    e3 = deq_results.read_table(exp / "fig_e3" / "summary.csv")
    assert [r["method"] for r in e3] == list(fig_deq.E3_METHODS)

    tables_deq.run("table_e2", exp / "table_e2" / "runs.csv")
    md = (exp / "table_e2" / "table.md").read_text()
    assert "Original limited backprop" in md and "Jacobian-Free (Fung" in md
    rows = deq_results.read_table(exp / "table_e2" / "table.csv")
    orig = next(r for r in rows if r["method"].startswith("Original ("))
    assert float(orig["forward_ms"]) == pytest.approx(31.0)
    assert float(orig["epoch_s"]) == pytest.approx(1.0) and orig["train_seeds"] == "3"
    assert orig["paper_forward_ms"] == ""  # digits: no paper value
    tables_deq.run("table_e3", exp / "table_e3" / "runs.csv")
    e3rows = deq_results.read_table(exp / "table_e3" / "table.csv")
    assert [r["method"] for r in e3rows] == [
        "Original",
        "Jacobian-Free",
        "SHINE (Broyden)",
        "SHINE (Adj. Broyden/OPA)",
    ]
    assert float(e3rows[-1]["paper_top1_cifar"]) == 93.04
    tables_deq.run("table_e1", exp / "table_e1" / "runs.csv")
    e1 = (exp / "table_e1" / "table.md").read_text()
    assert "230.5" in e1 and "27.7" in e1
    with pytest.raises(tables_deq.TableError):
        tables_deq.run("table_e1", tmp_path / "missing.csv")


def test_paper_reference_numbers_are_consistent():
    # Fig. 3 / Table E.2 share their CIFAR backward times (the paper's CSV)
    for key, (_, family, n) in deq_results.TABLE_E2_ROWS.items():
        fig = deq_results.PAPER_FIG3["cifar"][(family, n)]
        assert fig[1] == pytest.approx(deq_results.PAPER_TABLE_E2["cifar"][key][1], rel=0.02)
    assert deq_results.label("shine", 5) == "SHINE refine (5)"
    assert deq_results.label("original", 2) == "Original limited (2)"
    assert tables_deq.fmt_duration(280) == "4min40" and tables_deq.fmt_duration(13080) == "3h38"


# ----------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_py_deq_artefacts_end_to_end(tmp_path):
    runs, exp, figs = tmp_path / "runs", tmp_path / "exp", tmp_path / "figs"

    def train(*args):
        proc = subprocess.run(
            [sys.executable, "train.py", *args, f"paths.log_dir={runs}"],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    quick = ["trainer.pretrain_steps=3", "task.max_steps=6", "task.eval_limit=1"]
    train("-m", "+sweep=fig3_digits_refine", "seed=0", "n_backward=1", *quick)
    train("-m", "+sweep=fig3_digits", "seed=0", "method=shine", *quick)
    train("+experiment=digits_timing", "task.n_batches=2", "task.warmup=0")
    # runs/sweeps/fig3_digits/digits_shine/<overrides>/seed=0
    (shine_run,) = (runs / "sweeps" / "fig3_digits" / "digits_shine").rglob("seed=0")
    train(
        "+experiment=digits_contractivity",
        "method=shine",
        # a path holding "=" is quoted for Hydra's override parser
        f"task.checkpoint='{shine_run}'",
        "task.n_images=8",
        "task.n_iter_nonlinear=5",
        "task.n_iter_power=5",
        "task.n_iter_norm=2",
    )
    train(
        "+experiment=digits_opa_inversion_deq",
        "task.checkpoint=null",
        "task.n_batches=1",
        "task.batch_size=4",
        "task.exact.max_iter=10",
    )
    scripts = [
        ["collect.py", "fig3", "--runs", str(runs), "--out", str(exp)],
        ["collect.py", "table_e2", "--runs", str(runs), "--out", str(exp)],
        ["collect.py", "table_e1", "--runs", str(runs), "--out", str(exp)],
        ["collect.py", "fig_e3", "--runs", str(runs), "--out", str(exp)],
        ["fig_deq.py", "fig3", "--table", str(exp / "fig3/runs.csv"), "--out", str(figs)],
        ["fig_deq.py", "fig_e3", "--table", str(exp / "fig_e3/runs.csv"), "--out", str(figs)],
        ["tables_deq.py", "table_e2", "--table", str(exp / "table_e2/runs.csv")],
        ["tables_deq.py", "table_e1", "--table", str(exp / "table_e1/runs.csv")],
    ]
    for args in scripts:
        proc = subprocess.run(
            [sys.executable, f"scripts/{args[0]}", *args[1:]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
    rows = deq_results.read_table(exp / "fig3" / "runs.csv")
    assert {(r["method"], r["n"]) for r in rows} == {
        ("original_limited", "1"),
        ("shine_refine", "1"),
        ("jacobian_free_refine", "1"),
        ("shine", "0"),
    }
    assert (figs / "fig3.png").is_file() and (figs / "fig_e3.png").is_file()
    table = (exp / "table_e2" / "table.md").read_text()
    assert "SHINE Fallback (ours)" in table
    assert (exp / "table_e1" / "table.csv").is_file()
