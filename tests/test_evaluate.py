import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gridlab.data import CorpusSource, DocumentIndex, SplitFractions, TokenShard, train_tokenizer
from gridlab.evaluate import (
    HeldOut,
    _records,
    document_parts,
    document_windows,
    heldout_loss,
    lm_eval_tasks,
    sample_windows,
    task_chance,
    uniform_loss,
    unigram_log_probs,
    unigram_loss,
    window_losses,
)
from gridlab.measure import ratio_stderr
from gridlab.model import init_model, make_config
from gridlab.tasks import TASKS_DIR


def tiny_model(vocab: int, seq_len: int = 64):
    config = make_config("micro", vocab, seq_len, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return init_model(config, 0)


EOS = 0


def toy_shard(folder, documents: list[np.ndarray], seq_len: int, name: str = "v") -> TokenShard:
    """A single-file shard holding ``documents`` end to end, each followed by the eos token (as shards.py packs)."""
    stream = np.concatenate([np.append(np.asarray(d, np.uint16), EOS) for d in documents]).astype(np.uint16)
    stream.tofile(folder / f"{name}.bin")
    (folder / f"{name}.json").write_text(json.dumps({
        "seq_len": seq_len, "n_sequences": len(stream) // seq_len, "dtype": "uint16", "eos_token_id": EOS,
        "documents": [len(d) + 1 for d in documents]}))
    return TokenShard.open(folder / f"{name}.bin")


def random_documents(n: int, vocab: int = 128, seed: int = 0, longest: int = 60) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(1, longest))) for _ in range(n)]


def test_heldout_loss_scores_each_document_whole_after_the_eos(tmp_path):
    documents = random_documents(7, longest=50)
    shard = toy_shard(tmp_path, documents, seq_len=16)
    model = tiny_model(128, 16)
    expected_sum, expected_tokens = [], []
    for document in documents:  # by hand: [eos] + document + [eos], windows of 16 overlapping by one token
        inputs = torch.tensor([EOS, *document.tolist(), EOS])
        total = 0.0
        for start in range(0, len(inputs) - 1, 15):
            window = inputs[start:start + 16][None]
            with torch.no_grad():
                logits = model(input_ids=window).logits
            total += F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
        expected_sum.append(total)
        expected_tokens.append(len(document) + 1)
    result = heldout_loss(model, shard, batch_size=3)
    assert result.documents == 7 and result.tokens == sum(expected_tokens)
    assert result.doc_tokens.tolist() == expected_tokens
    assert result.doc_loss == pytest.approx(expected_sum, rel=1e-5)
    assert result.loss == pytest.approx(sum(expected_sum) / sum(expected_tokens), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.loss))
    assert result.stderr == ratio_stderr(result.doc_loss, result.doc_tokens)
    assert model.training  # the model's mode is restored
    # no token of another document in the context: a document scores the same alone
    alone = toy_shard(tmp_path, [documents[3]], seq_len=16, name="alone")
    assert heldout_loss(model, alone).doc_loss[0] == pytest.approx(expected_sum[3], rel=1e-5)


def test_windows_predict_every_token_once():
    lengths = np.array([1, 14, 15, 16, 31, 100])
    document, offset, size = document_windows(lengths, seq_len=16)
    for i, n in enumerate(lengths):
        mine = document == i
        predicted = np.concatenate([np.arange(o + 1, o + s) for o, s in zip(offset[mine], size[mine])])
        assert predicted.tolist() == list(range(1, n + 1))  # input = [eos] + n tokens: positions 1..n, each once
        assert (size[mine] <= 16).all() and (size[mine] >= 2).all()


def _index(lengths, seed=0) -> DocumentIndex:
    keys = np.random.default_rng(seed).integers(0, 2**63, size=len(lengths)).astype(np.uint64)
    return DocumentIndex.of(np.asarray(lengths, np.int64), keys, int(np.sum(lengths)))


def _windows_of(sample) -> set:
    """The sampled windows as (document key, offset) pairs."""
    return set(zip(sample.keys[sample.window_document].tolist(), sample.window_offset.tolist()))


def test_the_sample_is_seeded_windows_of_documents_spread_across_the_split():
    index = _index(np.random.default_rng(1).integers(130, 2000, size=2000))     # 3 to 32 windows of 64
    sample = sample_windows(index, 64, 600, 2, seed=0)
    again = sample_windows(index, 64, 600, 2, seed=0)
    assert _windows_of(sample) == _windows_of(again)                               # deterministic
    assert not np.array_equal(sample.documents, sample_windows(index, 64, 600, 2, seed=1).documents)  # seeded
    assert sample.n_windows == 600 and len(sample.documents) == 300                 # 2 windows of 300 documents
    assert (np.diff(sample.documents) > 0).all()                                    # stream order, no repeats
    assert (sample.sampled <= 2).all() and sample.sampled.sum() == 600
    assert np.array_equal(np.bincount(sample.window_document), sample.sampled)
    # the windows are those document_windows defines, distinct, and spread over the document (not its start)
    every = document_windows(index.lengths[sample.documents], 64)
    assert _windows_of(sample) <= set(zip(sample.keys[every[0]].tolist(), every[1].tolist()))
    assert len(_windows_of(sample)) == 600 and (sample.window_offset > 0).mean() > 0.8
    assert np.array_equal(sample.windows, np.bincount(every[0]))
    # documents from every tenth of the split, not its first files
    assert len(np.unique(sample.documents * 10 // len(index))) == 10
    # a larger sample extends a smaller one; a document's windows do not depend on the cap either
    assert _windows_of(sample) <= _windows_of(sample_windows(index, 64, 1200, 2, seed=0))
    assert _windows_of(sample_windows(index, 64, 300, 1, seed=0)) <= _windows_of(sample)


def test_a_document_with_few_windows_gives_them_all_and_a_small_split_is_used_whole():
    index = _index([10, 100, 200, 300, 1000])          # windows of 64: 1, 2, 4, 5, 16
    sample = sample_windows(index, 64, 28, 4, seed=3)
    assert sample.n_windows == 28 and sample.windows.tolist() == [1, 2, 4, 5, 16]
    assert sample_windows(index, 64, 28, 4, seed=3).sampled.tolist() == [1, 2, 4, 5, 16]   # all of them
    assert sample_windows(index, 64, 1000, 4, seed=3).sampled.tolist() == [1, 2, 4, 5, 16]
    assert sample_windows(index, 64, None, 1).sampled.tolist() == [1, 2, 4, 5, 16]
    # the documents run out before the windows: the windows are spread over every document
    spread = sample_windows(index, 64, 20, 1, seed=3)
    assert spread.n_windows == 20 and spread.sampled.tolist() == [1, 2, 4, 5, 8]
    # documents with fewer windows than the cap give all of theirs; the last document taken gives what is left
    capped = sample_windows(index, 64, 9, 3, seed=3)
    assert capped.n_windows == 9 and (capped.sampled <= np.minimum(capped.windows, 3)).all()
    # None: whole documents until the windows are reached, the last one whole
    whole = sample_windows(index, 64, 9, None, seed=3)
    assert (whole.sampled == whole.windows).all() and whole.sampled.sum() >= 9
    assert 9 <= whole.sampled.sum() < 9 + whole.windows.max()
    with pytest.raises(ValueError, match="windows_per_document"):
        sample_windows(index, 64, 9, 0)


def test_a_sampled_window_is_scored_exactly_as_in_whole_document_scoring(tmp_path):
    shard = toy_shard(tmp_path, random_documents(30, longest=120), seq_len=16)
    model = tiny_model(128, 16)
    index = shard.documents()
    every = sample_windows(index, 16, None, None)
    some = sample_windows(index, 16, 20, 1, seed=2)
    assert some.n_windows == 20 and (some.window_offset > 0).any()
    full = dict(zip(zip(every.keys[every.window_document].tolist(), every.window_offset.tolist()),
                    window_losses(model, shard, index, every, batch_size=7)))
    sampled = window_losses(model, shard, index, some, batch_size=3)
    keys = zip(some.keys[some.window_document].tolist(), some.window_offset.tolist())
    assert sampled == pytest.approx([full[key] for key in keys], rel=1e-5)
    # the loss is the weighted ratio over documents: each window counts windows / sampled of its document
    held = heldout_loss(model, shard, max_sequences=20, windows_per_document=1, seed=2)
    weights = (some.windows / some.sampled)[some.window_document]
    assert held.loss == pytest.approx((weights * sampled).sum() / (weights * (some.window_size - 1)).sum(), rel=1e-6)
    assert held.tokens == int((some.window_size - 1).sum()) and held.documents == len(some.documents)


def test_heldout_loss_samples_the_same_windows_for_every_model(tmp_path):
    shard = toy_shard(tmp_path, random_documents(40, longest=30), seq_len=16)
    first = heldout_loss(tiny_model(128, 16), shard, max_sequences=8, windows_per_document=1)
    other = heldout_loss(init_model(tiny_model(128, 16).config, 5), shard, max_sequences=8, windows_per_document=1)
    assert np.array_equal(first.keys, other.keys) and np.array_equal(first.doc_tokens, other.doc_tokens)
    assert _windows_of(first.sample) == _windows_of(other.sample)
    assert first.sample.n_windows == 8 and first.documents == 8
    assert first.loss != other.loss
    whole = heldout_loss(tiny_model(128, 16), shard, max_sequences=10_000, windows_per_document=1)
    assert whole.documents == 40 and (whole.sample.sampled == whole.sample.windows).all()  # all of a small split


def test_parts_are_disjoint_halves_fixed_by_the_document():
    index = _index(np.full(4000, 10))
    select = sample_windows(index, 64, None, 1, part="select").documents
    report = sample_windows(index, 64, None, 1, part="report").documents
    assert not set(select) & set(report) and len(select) + len(report) == 4000
    assert 0.45 < len(select) / 4000 < 0.55
    assert np.array_equal(document_parts(index)[select], np.ones(len(select), bool))
    # a document keeps its half whatever the sample's seed and size; samples of a half stay in it
    assert set(sample_windows(index, 64, 500, 1, seed=7, part="report").documents) <= set(report)
    # the half is a function of the key alone: another split holding the same key puts it in the same half
    shuffled = DocumentIndex.of(index.lengths[::-1].copy(), index.keys[::-1].copy(), 40_000)
    assert set(index.keys[select]) == set(shuffled.keys[document_parts(shuffled)])
    with pytest.raises(ValueError, match="part must be one of"):
        sample_windows(index, 64, None, 1, part="test")


def test_floors_on_toy_data(tmp_path):
    assert uniform_loss(1024) == math.log(1024)
    # training tokens with known counts: 600 × 1, 300 × 2, 100 × 3 (vocabulary 5: ids 0 and 4 unseen)
    train = toy_shard(tmp_path, [np.repeat([1, 2, 3], [600, 300, 99])], seq_len=10, name="train")  # + its eos (0)
    log_probs = unigram_log_probs(train, 5)
    counts = np.array([1, 600, 300, 99, 0]) + 1  # add-one smoothing
    assert log_probs == pytest.approx(np.log(counts / counts.sum()))
    held_documents = [np.array([1, 1, 2]), np.array([3, 4])]
    validation = toy_shard(tmp_path, held_documents, seq_len=4, name="val")
    every = sample_windows(validation.documents(), 4, None, None)
    held = HeldOut.of(every, np.ones(every.n_windows))
    floor = unigram_loss(log_probs, validation, held)
    expected = -(2 * log_probs[1] + log_probs[2] + log_probs[0] + log_probs[3] + log_probs[4] + log_probs[0])
    assert floor.loss == pytest.approx(expected / 7) and floor.doc_tokens.tolist() == [4, 3]
    # a sample of windows: the unigram cost of exactly the tokens each sampled window predicts, with its weight
    long = [np.arange(1, 5).repeat(5)[np.random.default_rng(i).permutation(20)] for i in range(6)]
    validation = toy_shard(tmp_path, long, seq_len=4, name="long")
    some = sample_windows(validation.documents(), 4, 8, 1, seed=1)
    floor = unigram_loss(log_probs, validation, HeldOut.of(some, np.zeros(some.n_windows)))
    inputs = [np.concatenate([[EOS], d, [EOS]]) for d in long]
    window_cost = [-log_probs[inputs[some.documents[d]][o + 1:o + size]].sum()
                   for d, o, size in zip(*some.window_tuple())]
    weights = (some.windows / some.sampled)[some.window_document]
    assert some.n_windows == 8 and (some.sampled < some.windows).any()
    assert floor.loss == pytest.approx((weights * window_cost).sum() / (weights * (some.window_size - 1)).sum())
    # on a large held-out sample drawn from the training distribution it is the distribution's entropy
    p = np.array([0.0, 0.5, 0.3, 0.2])
    rng = np.random.default_rng(0)
    train = toy_shard(tmp_path, [rng.choice(4, size=200_000, p=p)], seq_len=64, name="big")
    validation = toy_shard(tmp_path, [rng.choice(4, size=500, p=p) for _ in range(200)], seq_len=64, name="vbig")
    held = heldout_loss(tiny_model(128, 64), validation)
    entropy = -(p[1:] * np.log(p[1:])).sum()
    eos_cost = -unigram_log_probs(train, 4)[0] / 501   # each document's eos is predicted too
    assert unigram_loss(unigram_log_probs(train, 4), validation, held).loss == pytest.approx(
        entropy * 500 / 501 + eos_cost, abs=0.01)


def test_task_chance_is_the_mean_inverse_number_of_choices():
    items = [json.loads(line) for line in (TASKS_DIR / "stdlib_identifiers.jsonl").read_text().splitlines()]
    chance = task_chance(["gridlab_stdlib_identifiers"])
    assert chance == {"gridlab_stdlib_identifiers": pytest.approx(np.mean([1 / len(i["choices"]) for i in items]))}
    assert task_chance(["gridlab_stdlib_identifiers"], limit=5) == {
        "gridlab_stdlib_identifiers": pytest.approx(np.mean([1 / len(i["choices"]) for i in items[:5]]))}


def _task_items() -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / "stdlib_identifiers.jsonl").read_text().splitlines()]


def _shortest_share(items, length) -> float:
    """The script's own measure (scripts/make_stdlib_identifiers.py, which writes the task): how often guessing the
    shortest choice is right; 1/4 when length is no clue."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_stdlib_identifiers.py"
    spec = importlib.util.spec_from_file_location("make_stdlib_identifiers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shortest_share(items, length)


def test_task_files_ship_in_the_package():
    assert (TASKS_DIR / "stdlib_identifiers.yaml").is_file()
    items = _task_items()
    assert len(items) >= 250
    assert all(0 <= item["label"] < len(item["choices"]) == 4 for item in items)
    labels = np.bincount([item["label"] for item in items], minlength=4) / len(items)
    assert (np.abs(labels - 0.25) < 0.06).all()  # the answer is not in one place
    assert len({item["context"] for item in items}) == len(items)


def test_the_answer_is_not_the_shortest_choice_more_than_by_chance(tmp_path):
    from gridlab.data import DEFAULT_FRACTIONS, load_tokenizer

    items = _task_items()
    assert _shortest_share(items, len) <= 0.3
    # by tokens of a gridlab BPE (trained here on a sample of the default corpus, not the one the items were
    # matched on)
    tokenizer = load_tokenizer(train_tokenizer(CorpusSource(kind="stdlib", max_documents=400), DEFAULT_FRACTIONS,
                                               1024, tmp_path / "bpe"))
    assert _shortest_share(items, lambda word: len(tokenizer(word, add_special_tokens=False)["input_ids"])) <= 0.32


def test_task_items_come_from_validation_documents():
    import sys

    from gridlab.data import DEFAULT_FRACTIONS, assign_split, stdlib_root

    items = _task_items()
    assert {assign_split(item["doc"], DEFAULT_FRACTIONS) for item in items} == {"validation"}
    assert len({item["doc"] for item in items}) >= 50  # spread over the split, not a few files
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the items were drawn from Python 3.11's standard library")
    found = 0
    for item in items:
        lines = (stdlib_root() / item["doc"]).read_text(encoding="utf-8", errors="replace").splitlines()
        site = item["context"].splitlines()[-1].lstrip() + item["choices"][item["label"]]
        found += any(site in line for line in lines[max(0, item["line"] - 40):item["line"] + 40])
    assert found >= 0.95 * len(items)  # the context and its answer, where the item says (patch releases may move a few)


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
        value = record["value"]  # lm-eval's stderr of a mean of 0/1 scores over 8 items
        assert record["stderr"] == pytest.approx(math.sqrt(value * (1 - value) / 7))
        assert record["tokens"] == 1234 and record["higher_is_better"] is True


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


def test_eval_stages_carry_stderr_floors_and_their_documents(tmp_path):
    """The parent's and a fresh model's eval stages, run for real on a tiny grid: stderr on the held-out loss,
    floors in the parent's evaluation only, per-document losses that pair across the two."""
    import polars as pl

    from gridlab import execute
    from gridlab.layout import RunPaths
    from gridlab.plan import build_plan
    from gridlab.results import read_payload
    from gridlab.spec import parse_grid
    from gridlab.stages import execute_stage

    from runner_helpers import tiny_grid

    grid = tiny_grid(runs_dir=str(tmp_path), evaluation={"max_sequences": 1000, "lm_eval_tasks": [
        "gridlab_stdlib_identifiers"], "limit": 4},
                     splits={"pretrain": 0.4, "retrain": 0.3, "calibration": 0.1, "validation": 0.2})
    plan = build_plan(parse_grid(grid))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    stages = list(plan.stages.values())
    parent = next(s for s in stages if s.kind == "parent")
    parent_eval = next(s for s in stages if s.kind == "eval" and s.deps.get("model") == parent.id)
    init = next(s for s in stages if s.kind == "init")
    init_eval = next(s for s in stages if s.kind == "eval" and s.deps.get("model") == init.id)
    for stage in [next(s for s in stages if s.kind == "data"), parent, parent_eval, init, init_eval]:
        assert execute_stage(run_dir, stage.id, redirect_output=False), stage.kind
    run = RunPaths(run_dir)
    payload, fresh = read_payload(run.stage(parent_eval.id)), read_payload(run.stage(init_eval.id))
    metrics = {m.name: m for m in payload.metrics}
    assert metrics["val_loss"].stderr > 0 and metrics["val_ppl"].stderr > 0
    assert metrics["floor/uniform_loss"].value == math.log(512) and metrics["floor/uniform_loss"].stderr == 0
    assert 0 < metrics["floor/unigram_loss"].value < math.log(512) and metrics["floor/unigram_loss"].stderr > 0
    assert metrics["lm_eval/gridlab_stdlib_identifiers/chance"].value == 0.25
    floors = [m for m in payload.metrics if m.name.startswith("floor/") or m.name.endswith("/chance")]
    assert {(m.tokens, m.higher_is_better) for m in floors} == {(0, None)}
    assert not any(m.name.startswith("floor/") or m.name.endswith("/chance") for m in fresh.metrics)
    # per-document losses: the loss is their ratio, its stderr the linearised one, and both models scored the same
    # documents with the same weights, so their gap and its stderr come from these rows alone
    from gridlab.measure import DOCUMENT_LOSS_SCHEMA, paired_gap

    documents = pl.read_parquet(run.stage(parent_eval.id).document_losses)
    assert documents.schema == pl.Schema(DOCUMENT_LOSS_SCHEMA)
    assert payload.document_losses == str(run.stage(parent_eval.id).document_losses)
    assert set(documents["metric"]) == {"val_loss", "floor/unigram_loss"}
    own = documents.filter(pl.col("metric") == "val_loss")
    assert own["loss_sum"].sum() / own["tokens"].sum() == pytest.approx(metrics["val_loss"].value)
    assert ratio_stderr(own["loss_sum"], own["tokens"]) == pytest.approx(metrics["val_loss"].stderr)
    other = pl.read_parquet(run.stage(init_eval.id).document_losses).filter(pl.col("metric") == "val_loss")
    assert other["document"].to_list() == own["document"].to_list()
    assert other["tokens"].to_list() == own["tokens"].to_list()
    fresh_loss = next(m for m in fresh.metrics if m.name == "val_loss").value
    assert paired_gap(own, other).value == pytest.approx(metrics["val_loss"].value - fresh_loss)
    data = read_payload(run.stage(next(s.id for s in stages if s.kind == "data")))
    split = TokenShard.open(data.shards["validation"]).documents()
    every = int(document_windows(split.lengths, 32)[0].size)
    assert own["sampled"].sum() == min(1000, every) and own.height >= 2
    assert (own["sampled"] <= own["windows"]).all() and own["windows"].sum() <= every
