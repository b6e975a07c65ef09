import json
import math

import numpy as np
import pytest
import torch

from gridlab.data import CorpusSource, SplitFractions, TokenShard, train_tokenizer
from gridlab.evaluate import _records, heldout_loss, lm_eval_tasks
from gridlab.model import init_model, make_config
from gridlab.tasks import TASKS_DIR


def tiny_model(vocab: int, seq_len: int = 64):
    config = make_config("micro", vocab, seq_len, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return init_model(config, 0)


def test_heldout_loss_is_the_mean_next_token_loss(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 128, size=(10, 16)).astype(np.uint16)
    tokens.tofile(tmp_path / "v.bin")
    (tmp_path / "v.json").write_text(json.dumps({"seq_len": 16, "n_sequences": 10, "dtype": "uint16"}))
    shard = TokenShard.open(tmp_path / "v.bin")
    model = tiny_model(128, 16)
    with torch.no_grad():
        expected = model(input_ids=shard[0:7], labels=shard[0:7]).loss.item()
    result = heldout_loss(model, shard, max_sequences=7, batch_size=3)
    assert result["tokens"] == 7 * 15
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert heldout_loss(model, shard)["tokens"] == 10 * 15
    assert model.training  # the model's mode is restored


def test_task_files_ship_in_the_package():
    assert (TASKS_DIR / "stdlib_identifiers.yaml").is_file()
    items = [json.loads(line) for line in (TASKS_DIR / "stdlib_identifiers.jsonl").read_text().splitlines()]
    assert len(items) >= 40
    assert all(0 <= item["label"] < len(item["choices"]) == 4 for item in items)
    assert len({item["label"] for item in items}) == 4  # the answer is not always in the same place


def test_gridlab_task_runs_offline_from_any_directory(tmp_path, monkeypatch):
    source = CorpusSource(kind="stdlib", max_documents=30)
    tokenizer_dir = train_tokenizer(source, SplitFractions(), 600, tmp_path / "tok")
    from gridlab.data import load_tokenizer

    monkeypatch.chdir(tmp_path)  # the task's .jsonl must be found relative to the package, not the cwd
    records = lm_eval_tasks(tiny_model(600), load_tokenizer(tokenizer_dir), ["gridlab_stdlib_identifiers"],
                            limit=8, trained_tokens=1234)
    by_name = {record["name"]: record for record in records}
    assert set(by_name) == {"lm_eval/gridlab_stdlib_identifiers/acc", "lm_eval/gridlab_stdlib_identifiers/acc_norm"}
    for record in records:
        assert 0 <= record["value"] <= 1 and record["value"] * 8 == round(record["value"] * 8)
        assert record["stderr"] > 0 and record["tokens"] == 1234 and record["higher_is_better"] is True


@pytest.mark.slow  # indexes lm-eval's whole task registry (~30 s)
def test_unknown_task_is_a_one_line_error():
    with pytest.raises(ValueError, match="'no_such_task' is not an lm-eval task.*gridlab_stdlib_identifiers") as error:
        lm_eval_tasks(tiny_model(64), None, ["no_such_task"])
    assert "\n" not in str(error.value)


def test_records_flatten_lm_eval_results():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc,strict": 0.25,
                     "acc_stderr,strict": "N/A"}}
    assert _records(results, {"t": {"acc": True}}, 7) == [
        {"name": "lm_eval/t/acc", "value": 0.5, "stderr": 0.1, "tokens": 7, "higher_is_better": True},
        {"name": "lm_eval/t/acc_strict", "value": 0.25, "stderr": None, "tokens": 7, "higher_is_better": True},
    ]
