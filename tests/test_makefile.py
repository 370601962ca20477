"""The Makefile's pipeline: `make train CONFIG=X` builds the init and the data that X names (when they are the
pipeline's outputs) and nothing else; `make eval` writes beside the model folder. Checked with make -n -B (nothing
runs but the config reading; -B: as if nothing were built yet)."""

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_n(*args):
    r = subprocess.run(["make", "-n", "-B", *args, f"PY={sys.executable}"], cwd=ROOT, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if not line.startswith("needs=")]  # the config-reading line


def test_make_train_builds_what_the_config_names():
    demo = "\n".join(make_n("train", "CONFIG=config/demo_target.py"))  # names its own init and data
    assert "clp.py" not in demo and "data.py" not in demo and "pythia" not in demo.lower()
    assert f"{sys.executable} train.py config/demo_target.py" in demo
    random_init = "\n".join(make_n("train", "CONFIG=config/oscar_de_random_init.py", "DATA_DIR=/nonexistent"))
    assert "--target_model_path out/pythia-410m-small_init-german" in random_init and "--random_init" in random_init
    assert "out/pythia-410m-clp-german" not in random_init  # the CLP init is not what it trains
    assert "data.py" not in random_init  # its data_dir (data/oscar_de) is not this DATA_DIR
    clp = "\n".join(make_n("train", "CONFIG=config/oscar_de_embedding_tuning.py", "ARGS=--init_from=scratch"))
    assert "clp.py" not in clp and "data.py" in clp


def test_make_eval_writes_beside_the_model_folder():
    for model in ("out/run/hf", "out/run/hf/"):
        assert "--output out/run/eval.json" in "\n".join(make_n("eval", f"MODEL={model}"))


def test_make_test_says_why_a_test_skipped(tmp_path):
    """make test runs pytest with the repository's pytest.ini, whose -rs lists each skip with its reason (the GPU
    tests on a machine without one)."""
    assert f"{sys.executable} -m pytest -q tests" in make_n("test")
    (tmp_path / "test_skips.py").write_text("import pytest\n\n\ndef test_gpu():\n    pytest.skip('no CUDA device')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", f"{ROOT}/pytest.ini", "--rootdir", str(tmp_path),
                        str(tmp_path / "test_skips.py")], cwd=ROOT, text=True, capture_output=True)
    assert r.returncode == 0 and "SKIPPED [1] " in r.stdout and ": no CUDA device" in r.stdout, r.stdout
