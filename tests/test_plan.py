"""The run plan (toa.plan): the run id is a pure function of the resolved config, the method
options and the code that produces results; `toa plan` says what a run would do, starting
nothing. Real files, a real results root; no server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from toa.flows.params import RunParameters, check_declares

import toa
from toa.config import load_config
from toa.plan import RESULT_SOURCES, code_version, plan_run, run_id
from toa.storage import Store

PACKAGE = Path(toa.__file__).parent


def _copy_result_sources(dest: Path) -> Path:
    for name in RESULT_SOURCES:
        src = PACKAGE / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def test_editing_a_method_changes_the_run_id_and_an_operational_change_does_not(tmp_path):
    cfg = load_config()
    pkg = _copy_result_sources(tmp_path / "toa")
    before = code_version(pkg)
    assert before == code_version(PACKAGE)  # the copy is the same code
    random_py = pkg / "methods" / "random.py"
    random_py.write_text(random_py.read_text().replace("N = n * number of agents", "N = n * M"))
    code_version.cache_clear()
    after = code_version(pkg)
    assert after != before and after.startswith(toa.__version__ + "+")
    assert run_id(cfg, after) != run_id(cfg, before)
    operational = load_config(overrides={"prompt_concurrency": 3, "task_retries": 0, "agents.0.max_concurrency": 1,
                                         "results_root": str(tmp_path / "elsewhere")})
    assert run_id(operational, before) == run_id(cfg, before)


def test_a_template_edit_changes_the_code_version(tmp_path):
    pkg = _copy_result_sources(tmp_path / "toa")
    before = code_version(pkg)
    refine = pkg / "templates" / "refine.txt"
    refine.write_text(refine.read_text() + "\n")
    code_version.cache_clear()
    assert code_version(pkg) != before


def test_method_options_enter_the_run_id_validated_with_defaults_filled_in():
    base = run_id(load_config(overrides={"methods": ["toa"], "n": 3}))
    assert run_id(load_config(overrides={"methods": ["toa"], "n": 3, "method_options": {"toa": {"tau": 0.1}}})) == base
    assert run_id(load_config(overrides={"methods": ["toa"], "n": 3, "method_options": {"toa": {"tau": 0.2}}})) != base


def test_one_method_instance_per_run():
    cfg = load_config(overrides={"methods": ["random", "toa"], "n": 3})
    plan = plan_run(cfg)
    assert plan.methods is cfg.method_objects
    assert plan.methods["toa"] is plan_run(cfg).methods["toa"]
    assert plan.run_id == run_id(cfg)


def test_toa_and_evolve_flows_declare_the_same_run_parameters():
    from toa.flows.evolve import toa_evolve
    from toa.flows.synthesize import toa as toa_flow

    check_declares(toa_flow.fn)
    check_declares(toa_evolve.fn, extra=("iterations", "evolve"))
    assert "seed" in RunParameters.model_fields

    def drifted(config_file=None, methods=None, n=None):
        pass

    with pytest.raises(TypeError, match="differ from RunParameters"):
        check_declares(drifted)


def _toa_plan(root: Path, *sets: str) -> str:
    out = subprocess.run([sys.executable, "-m", "toa.cli", "plan", "--set", f"results_root={root}", *sets],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_toa_plan_prints_the_run_id_the_units_and_the_work_starting_nothing(tmp_path):
    root = tmp_path / "results"
    text = _toa_plan(root, "--set", "prompts.limit=4")
    cfg = load_config(overrides={"results_root": str(root), "prompts.limit": 4})
    plan = plan_run(cfg)
    assert f"run {plan.run_id} " in text
    assert "random: 0 of 1 batches done; 1 to run (4 prompts, 16 generations)" in text
    assert not root.exists()  # nothing written, nothing started

    from toa.batches import planned_batches
    from toa.units import BatchStats, mark_done

    batch = planned_batches(cfg)[0]
    store = Store(str(root))  # a finished unit as run_batch leaves it: its samples shard, then its marker
    store.write_rows("samples", [], f"run={plan.run_id}", "method=random", f"{batch.key}.parquet")
    mark_done(store, plan.run_id, BatchStats("random", batch.key, prompts=4, samples=16))
    text = _toa_plan(root, "--set", "prompts.limit=4")
    assert "random: 1 of 1 batches done; 0 to run" in text and "parallel_ensemble: 0 of 1 batches done" in text
