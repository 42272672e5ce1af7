"""`skipvlm study --quick`: every part's JSON, table and plot, with the right rows; resumed jobs; stats."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from skipvlm import study
from skipvlm.cli import main
from skipvlm.study import StudyConfig, run_jobs
from skipvlm.study_report import percentile, spearman

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(["study", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "study.json").read_text())


def test_quick_study_writes_every_part(quick_run):
    out, result = quick_run
    parts = result["parts"]
    assert set(parts) == set(study.PARTS)
    config = StudyConfig.quick_config()
    assert result["meta"]["config"]["quick"] is True
    tables = (out / "tables.md").read_text()
    for heading in ("Search validation", "Skipped attentions k", "Candidates", "PIA design ablations"):
        assert f"## {heading}" in tables
    for name in ("validation.png", "contrast.png", "k_sweep.png", "candidates.png", "ablations.png"):
        assert (out / name).read_bytes()[:4] == PNG, name
    for seed in config.search_seeds:
        assert (out / f"preferences_s{seed}.png").read_bytes()[:4] == PNG
    # every job wrote its result atomically: no temporary files left
    assert not [p for p in (out / "jobs").iterdir() if p.name.startswith(".")]


def test_quick_validation_places_every_search_among_all_plans(quick_run):
    v = quick_run[1]["parts"]["validation"]
    config = StudyConfig.quick_config()
    ground = {g["plan"]: g for g in v["ground_truth"]}
    assert sorted(ground) == [str(i) for i in range(8)]  # every k=1 plan of the 8-layer toy
    assert [s["seed"] for s in v["searches"]] == list(config.search_seeds)
    accs = [g["accuracy"] for g in v["ground_truth"]]
    for entry in v["searches"]:
        assert entry["plan"] in ground and entry["accuracy"] == ground[entry["plan"]]["accuracy"]
        assert entry["percentile_accuracy"] == percentile(accs, list(ground).index(entry["plan"]))
        assert len(entry["preferences"]) == 8 and entry["updates"] > 0
        for key in ("spearman_h_accuracy", "spearman_h_nll", "spearman_proxy_accuracy", "spearman_proxy_nll"):
            assert math.isnan(entry[key]) or -1 <= entry[key] <= 1
    assert v["controls"]["last_k"]["plan"] == "7"
    assert {f"random s={s}" for s in config.search_seeds} < set(v["controls"])
    summary = v["summary"]
    assert (
        summary["plans"] == 8
        and summary["accuracy_min"] <= summary["accuracy_median"] <= summary["accuracy_max"]
    )
    assert summary["seeds"] == 2 and summary["seed_sd_accuracy"] is not None
    for g in v["ground_truth"]:  # a plan's score is the mean of its training seeds
        assert len(g["runs"]) == 2
        assert g["accuracy"] == pytest.approx(sum(r["accuracy"] for r in g["runs"]) / 2)
    contrast = v["contrast"]  # where the choice should matter more: bandit plans beside random ones
    assert contrast["k"] == config.contrast_k and list(contrast["plans"]) == [
        "bandit s=0", "bandit s=1", "random 0", "random 1", "last_k",
    ]  # fmt: skip
    assert contrast["plans"]["last_k"]["plan"] == "6,7"
    randoms = [contrast["plans"][f"random {i}"]["plan"] for i in range(2)]
    assert len(set(randoms)) == 2 and all(len(p.split(",")) == 2 for p in randoms)
    for who in ("bandit s=0", "bandit s=1"):
        mine = contrast["plans"][who]
        beaten = sum(mine["accuracy"] > contrast["plans"][f"random {i}"]["accuracy"] for i in range(2))
        ties = sum(mine["accuracy"] == contrast["plans"][f"random {i}"]["accuracy"] for i in range(2))
        assert mine["beats_random_accuracy"] == 100 * (beaten + ties / 2) / 2
    tests = config.test_examples
    right = summary["binomial_se"] ** 2 * tests  # = p (1 - p) with p the mean accuracy
    assert 0 <= right <= 0.25


def test_quick_k_sweep_rows(quick_run):
    rows = quick_run[1]["parts"]["k_sweep"]
    assert [r["k"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert len(r["skip_attention"]) == r["k"] and not r["skip_mlp"] and r["merged"]
        assert r["decode_ms_per_token"] >= 0 and r["prefill_ms"] > 0
    macs = [r["macs_g"] for r in rows]
    trainable = [r["trainable_pct"] for r in rows]
    assert macs == sorted(macs, reverse=True) and macs[0] > macs[-1]
    assert trainable == sorted(trainable) and trainable[0] < trainable[-1]  # each replace-PIA adds parameters


def test_quick_candidate_rows(quick_run):
    rows = quick_run[1]["parts"]["candidates"]
    names = [(r["row"], r["k"]) for r in rows]
    assert names == [(row, 2) for row in study.CANDIDATE_ROWS]
    by = {(r["row"], r["k"]): r for r in rows}
    for k in (2,):
        assert len(by["MHA", k]["skip_attention"]) == k and not by["MHA", k]["skip_mlp"]
        assert len(by["FFN (PIA)", k]["skip_mlp"]) == k and not by["FFN (PIA)", k]["skip_attention"]
        both = by["MHA or FFN (PIA)", k]
        assert len(both["skip_attention"]) + len(both["skip_mlp"]) == k
        # the plain skip trains the plan the FFN-PIA search found, with fewer parameters
        plain, pia = by["FFN (plain skip)", k], by["FFN (PIA)", k]
        assert plain["skip_mlp"] == pia["skip_mlp"]
        assert plain["trainable_params"] < pia["trainable_params"] and plain["macs_g"] < pia["macs_g"]


def test_quick_ablation_rows(quick_run):
    rows = quick_run[1]["parts"]["ablations"]
    assert [r["name"] for r in rows] == list(study.ABLATIONS)
    by = {r["name"]: r for r in rows}
    plan = by["+ Frozen bias"]["skip_attention"]
    assert len(plan) == StudyConfig.quick_config().ablation_k
    assert all(r["skip_attention"] == plan for r in rows)
    assert [r["merged"] for r in rows] == [merged for _, merged in study.ABLATIONS.values()]
    assert by["Base (single path)"]["trainable_params"] < by["+ Info. Exc."]["trainable_params"]
    # re-parameterisation folds the adapters away: fewer MACs than the same model unmerged
    assert by["+ Re-param"]["macs_g"] < by["+ Frozen bias"]["macs_g"]
    assert by["+ Re-param"]["accuracy_unmerged"] == by["+ Frozen bias"]["accuracy"]


def test_a_rerun_reuses_every_finished_job(quick_run, monkeypatch, capsys):
    out, first = quick_run

    def refuse(*args):
        raise AssertionError("a finished job ran again")

    monkeypatch.setattr(study, "run_job", refuse)
    assert main(["study", "--quick", "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "study.json").read_text())
    assert again["parts"]["validation"]["ground_truth"] == first["parts"]["validation"]["ground_truth"]
    assert again["parts"]["candidates"] == first["parts"]["candidates"]


def test_jobs_rerun_when_their_settings_change(tmp_path, monkeypatch):
    ran = []

    def fake(spec, settings, seed, folder):
        ran.append(spec["seed"])
        return {"value": spec["seed"] * 10 + settings["epochs"]}

    monkeypatch.setattr(study, "run_job", fake)
    specs = [{"kind": "train", "eas": {"skip_attention": [i], "skip_mlp": []}, "seed": i} for i in range(3)]
    config = StudyConfig.quick_config()
    assert {r["value"] for r in run_jobs(specs, config, tmp_path, progress=False).values()} == {1, 11, 21}
    assert run_jobs(specs, config, tmp_path, progress=False) and ran == [0, 1, 2]  # all reused
    config = StudyConfig.quick_config(epochs=2)
    assert {r["value"] for r in run_jobs(specs, config, tmp_path, progress=False).values()} == {2, 12, 22}
    assert ran == [0, 1, 2, 0, 1, 2]  # a changed budget reruns every job, never reuses a stale result
    # a damaged result file is run again rather than trusted
    damaged = sorted((tmp_path / "jobs").glob("*.json"))[0]
    damaged.write_text("{")
    run_jobs(specs, config, tmp_path, progress=False)
    assert len(ran) == 7


def test_percentile_and_spearman_by_hand():
    scores = [0.5, 0.7, 0.7, 0.9]
    assert percentile(scores, 3) == 100 and percentile(scores, 0) == 0
    assert percentile(scores, 1) == pytest.approx(100 * 1.5 / 3)  # beats one, ties one
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # with ties: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3) -> 0.9486832981
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832981)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1])


def test_study_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"StudyConfig\.parts"):
        StudyConfig(parts=("validation", "tables"))
    with pytest.raises(ValueError, match=r"StudyConfig\.val_examples=8 holds no full batch"):
        StudyConfig(val_examples=8)


def test_cli_refuses_unknown_parts(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--out", "x", "--parts", "validation,foo"])
    assert "--parts takes some of validation,k_sweep,candidates,ablations" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_processes_compute_what_this_process_computes(tmp_path):
    """The process pool runs the same jobs to the same numbers (fresh interpreters, one thread each)."""
    import torch

    from skipvlm.eas import EASConfig
    from skipvlm.study import _train_spec

    specs = [_train_spec(EASConfig(skip_attention=[i]), 0) for i in (2, 5)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = run_jobs(specs, StudyConfig.quick_config(workers=1), tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    pool = run_jobs(specs, StudyConfig.quick_config(workers=2), tmp_path / "two", progress=False)
    assert here.keys() == pool.keys()
    for jid in here:
        assert pool[jid]["accuracy"] == here[jid]["accuracy"]
        assert pool[jid]["answer_nll"] == pytest.approx(here[jid]["answer_nll"], rel=1e-5)
        assert (tmp_path / "two" / "jobs" / jid / "adapters" / "adapter_model.safetensors").is_file()


def test_cli_sizes_override_the_chosen_config(tmp_path, monkeypatch):
    seen = []

    def fake(config, out, progress=True):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(study, "run_study", fake)
    with pytest.raises(SystemExit):
        main(
            [
                "study",
                "--quick",
                "--out",
                str(tmp_path),
                "--epochs",
                "3",
                "--contrast-k",
                "0",
                "--workers",
                "2",
            ]
        )
    config = seen[0]
    assert config.quick and config.epochs == 3 and config.contrast_k == 0 and config.workers == 2
    assert config.train_examples == StudyConfig.quick_config().train_examples  # the rest stay quick


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_kill_stops_the_workers_too(tmp_path, how):
    """Ctrl-C (SIGINT to the process group) or kill (SIGTERM to the study) stops every worker process;
    they ran on, for minutes, after the study itself had stopped."""
    out = tmp_path / "study"
    command = [sys.executable, "-m", "skipvlm.cli", "study", "--quick", "--workers", "2", "--out", str(out)]
    study = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    group = study.pid  # its own process group: the study and its workers
    deadline = time.monotonic() + 120
    while not list((out / "jobs").glob("*")) and time.monotonic() < deadline:  # the workers have started
        time.sleep(0.5)
    time.sleep(2)
    if how == signal.SIGINT:
        os.killpg(group, signal.SIGINT)
    else:
        study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=60) != 0
    deadline = time.monotonic() + 20  # the workers and multiprocessing's resource tracker wind down
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return  # nobody is left in the study's process group
        time.sleep(0.5)
    pytest.fail("worker processes outlived the stopped study")


def test_the_settings_name_the_shipped_toy_so_a_moved_checkout_reuses_its_jobs(tmp_path):
    from skipvlm.toy import SHIPPED

    assert StudyConfig().training()["model"] == "skipvlm:toy-llava"
    assert StudyConfig(model=str(SHIPPED / ".")).training()["model"] == "skipvlm:toy-llava"
    assert StudyConfig(model=str(tmp_path)).training()["model"] == str(tmp_path.resolve())
