"""Stage `evaluate`: BLiMP scored two ways, loss against a direct computation, refusals, eval.json."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from babydistill.pipeline.config import BUNDLED_BLIMP, Config
from babydistill.pipeline.evaluate import (
    FIELDS,
    blimp_accuracy,
    evaluate_model,
    load_blimp,
    score_blimp,
    split_loss,
)
from babydistill.pipeline.model import build_model, llama_config
from babydistill.pipeline.report import write_report
from babydistill.pipeline.tokenizer import BOS, EOD, PAD, build_bpe, load_tokenizer
from babydistill.stores.tokens import TokenStore

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# one paradigm of each field, plus one whose lengths differ a lot between its pairs
PARADIGMS = ("anaphor_number_agreement", "adjunct_island", "existential_there_quantifiers_1",
             "principle_A_case_2", "wh_vs_that_with_gap_long_distance")


def copy_tokenizer(tokenizer_dir: Path, model_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, model_dir / name)


def train_tiny_model(config: Config, store: TokenStore, seed: int, steps: int) -> LlamaForCausalLM:
    """A few plain AdamW steps, so the model's preferences are not those of random weights."""
    model = build_model(config, store, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        windows_BT = torch.from_numpy(store.windows("train", rng.integers(0, store.num_windows("train"), 8)))
        logits_BTV = model(input_ids=windows_BT[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), windows_BT[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the second
    thread's barrier waits made this module 4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_eval_run(tiny_run: Config, tmp_path_factory) -> tuple[Config, Path]:
    """A run folder holding one trained tiny teacher (tokens and tokenizer from tiny_run)."""
    root = tmp_path_factory.mktemp("eval_run")
    model_dir = root / "teachers" / "t1"
    model = train_tiny_model(tiny_run, TokenStore(tiny_run.tokens_path), seed=1, steps=30)
    model.save_pretrained(model_dir)
    copy_tokenizer(tiny_run.tokenizer_path, model_dir)
    lines = [{"kind": "train", "step": s, "epoch": 0, "lr": 1e-3, "loss": 6.0 - 0.1 * s, "tokens_per_second": 1e4}
             for s in range(1, 31)] + [{"kind": "val", "step": 30, "epoch": 1, "val_loss": 3.5}]
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return Config(run_dir=str(root)), model_dir


# --- BLiMP: batched scorer against a plain per-sentence computation -----------------------


def per_sentence_logprob(model, tokenizer, sentence: str) -> float:
    """Unbatched, unpadded: transformers' own shifted CE over the tokens after <s>."""
    input_ids = tokenizer(sentence, return_tensors="pt").input_ids
    assert input_ids[0, 0].item() == tokenizer.convert_tokens_to_ids(BOS)
    with torch.no_grad():
        mean_nll = model(input_ids=input_ids, labels=input_ids).loss.item()
    return -mean_nll * (input_ids.shape[1] - 1)


def test_blimp_batched_matches_per_sentence(tiny_run, tiny_eval_run):
    _, model_dir = tiny_eval_run
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tiny_run.tokenizer_path)
    pairs = [p for p in load_blimp(BUNDLED_BLIMP, max_pairs=30, seed=3) if p.uid in PARADIGMS]
    assert len(pairs) == 30 * len(PARADIGMS)

    batched = score_blimp(model, tokenizer, pairs, batch_size=7).numpy()
    plain = np.array([[per_sentence_logprob(model, tokenizer, p.good), per_sentence_logprob(model, tokenizer, p.bad)]
                      for p in pairs])

    diff = np.abs(batched - plain)
    worst = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() < 5e-4, f"max |batched - plain| = {diff.max():.2e} at {worst}: {batched[worst]} vs {plain[worst]}"
    margins = np.abs(plain[:, 0] - plain[:, 1])
    # decisions can only agree by luck when a margin is within the numerical difference
    assert margins.min() > 10 * diff.max(), f"near-tie: margin {margins.min():.2e}, error {diff.max():.2e}; change the seed"
    batched_right, plain_right = batched[:, 0] > batched[:, 1], plain[:, 0] > plain[:, 1]
    disagree = np.flatnonzero(batched_right != plain_right)
    assert disagree.size == 0, f"{disagree.size} pairs decided differently, first: {pairs[disagree[0]]}"
    assert blimp_accuracy(pairs, batched_right) == blimp_accuracy(pairs, plain_right)
    # not a degenerate scorer: the decisions are not all the same
    assert 0 < batched_right.sum() < len(pairs)


def test_blimp_batch_size_does_not_change_scores(tiny_run, tiny_eval_run):
    _, model_dir = tiny_eval_run
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tiny_run.tokenizer_path)
    pairs = [p for p in load_blimp(BUNDLED_BLIMP, max_pairs=4, seed=0) if p.uid in PARADIGMS]
    one = score_blimp(model, tokenizer, pairs, batch_size=1)
    many = score_blimp(model, tokenizer, pairs, batch_size=64)
    torch.testing.assert_close(many, one, atol=1e-3, rtol=0)


def test_blimp_accuracy_is_mean_over_paradigms():
    pairs = [p for p in load_blimp(BUNDLED_BLIMP, max_pairs=4, seed=0) if p.uid in PARADIGMS[:3]]
    correct = [True] * 4 + [True, False, False, False] + [False] * 4
    acc = blimp_accuracy(pairs, correct)
    assert acc["paradigms"] == {"adjunct_island": 1.0, "anaphor_number_agreement": 0.25,
                                "existential_there_quantifiers_1": 0.0}
    assert acc["fields"] == {"morphology": 0.25, "syntax": 1.0, "semantics": 0.0}
    assert acc["overall"] == pytest.approx(1.25 / 3)


# --- BLiMP data ---------------------------------------------------------------------------


def test_zip_and_folder_give_the_same_pairs(tmp_path):
    folder = tmp_path / "blimp_folder"
    with zipfile.ZipFile(BUNDLED_BLIMP) as archive:
        archive.extractall(folder)
    assert load_blimp(folder, max_pairs=20, seed=1) == load_blimp(BUNDLED_BLIMP, max_pairs=20, seed=1)
    # a flat zip of a few files, and the same files in a flat folder
    few = tmp_path / "few"
    few.mkdir()
    with zipfile.ZipFile(tmp_path / "few.zip", "w") as archive:
        for uid in PARADIGMS[:3]:
            shutil.copy(folder / "blimp" / f"{uid}.jsonl", few / f"{uid}.jsonl")
            archive.write(few / f"{uid}.jsonl", f"{uid}.jsonl")
    from_zip, from_folder = load_blimp(tmp_path / "few.zip"), load_blimp(few)
    assert from_zip == from_folder
    assert len(from_zip) == 3000 and sorted({p.uid for p in from_zip}) == sorted(PARADIGMS[:3])


def test_seeded_subset_is_stable(tmp_path):
    pairs = load_blimp(BUNDLED_BLIMP, max_pairs=5, seed=0)
    assert pairs == load_blimp(BUNDLED_BLIMP, max_pairs=5, seed=0)
    assert pairs != load_blimp(BUNDLED_BLIMP, max_pairs=5, seed=1)
    uids = sorted({p.uid for p in pairs})
    assert len(uids) == 67 and len(pairs) == 67 * 5
    assert {p.field for p in pairs} == set(FIELDS)
    # pinned: a change here silently changes every reported BLiMP number of capped runs
    assert [p.pair_id for p in pairs if p.uid == "adjunct_island"] == PINNED_ADJUNCT_ISLAND
    # a paradigm's subset does not depend on which other paradigms are loaded
    with zipfile.ZipFile(BUNDLED_BLIMP) as archive:
        archive.extract("blimp/adjunct_island.jsonl", tmp_path)
    alone = load_blimp(tmp_path / "blimp", max_pairs=5, seed=0)
    assert alone == [p for p in pairs if p.uid == "adjunct_island"]
    full = load_blimp(tmp_path / "blimp")
    assert len(full) == 1000 and set(alone) <= set(full)


PINNED_ADJUNCT_ISLAND = ['176', '193', '219', '763', '839']  # seed 0, 5 pairs


def test_blimp_bad_path_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.jsonl"):
        load_blimp(tmp_path / "empty")
    with pytest.raises(ValueError, match="folder of \\*.jsonl"):
        load_blimp(tmp_path / "missing.zip")


# --- loss ---------------------------------------------------------------------------------


def test_loss_equals_direct_computation(tiny_run, tiny_eval_run):
    _, model_dir = tiny_eval_run
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    store = TokenStore(tiny_run.tokens_path)
    for split in ("validation", "test"):
        got = split_loss(model, store, split, max_windows=3, batch_size=2)
        # transformers' own shifted loss on each whole window (seq_len + 1 tokens -> seq_len predictions)
        with torch.no_grad():
            direct = [model(input_ids=w[None], labels=w[None]).loss.item()
                      for w in torch.from_numpy(store.windows(split, [0, 1, 2]))]
        assert got["num_windows"] == 3 and got["num_tokens"] == 3 * store.seq_len
        assert got["ce"] == pytest.approx(np.mean(direct), abs=1e-5)
        assert got["perplexity"] == pytest.approx(np.exp(np.mean(direct)), rel=1e-5)


# --- refusals -----------------------------------------------------------------------------


def test_model_with_another_tokenizer_is_refused(tiny_run, tiny_eval_run, tmp_path):
    _, model_dir = tiny_eval_run
    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)
    sentences = [f"A different little corpus, line {i}, with other words entirely." for i in range(200)]
    bpe = build_bpe(sentences, vocab_size=300, min_frequency=1)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOD, pad_token=PAD).save_pretrained(other)
    with pytest.raises(ValueError) as error:
        evaluate_model(tiny_run.eval, other, tiny_run.tokens_path, tiny_run.tokenizer_path)
    message = str(error.value)
    assert "\n" not in message and str(other) in message and str(tiny_run.tokenizer_path) in message
    assert "another tokenizer" in message
    assert not (other / "eval.json").exists()


def test_model_with_another_vocab_is_refused(tiny_run, tmp_path):
    store = TokenStore(tiny_run.tokens_path)
    other = tmp_path / "big_vocab"
    lc = llama_config(tiny_run, store)
    lc.vocab_size = store.vocab_size + 64
    LlamaForCausalLM(lc).save_pretrained(other)
    copy_tokenizer(tiny_run.tokenizer_path, other)
    with pytest.raises(ValueError, match="vocab size") as error:
        evaluate_model(tiny_run.eval, other, tiny_run.tokens_path, tiny_run.tokenizer_path)
    assert str(other) in str(error.value) and str(tiny_run.tokens_path) in str(error.value)


def test_model_without_tokenizer_is_refused(tiny_run, tiny_eval_run, tmp_path):
    _, model_dir = tiny_eval_run
    other = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        evaluate_model(tiny_run.eval, other, tiny_run.tokens_path, tiny_run.tokenizer_path)


# --- the stage end to end ----------------------------------------------------------------


def test_evaluate_model_writes_eval_json_and_report(tiny_run, tiny_eval_run, tmp_path):
    run, model_dir = tiny_eval_run
    result = evaluate_model(tiny_run.eval, model_dir, tiny_run.tokens_path, tiny_run.tokenizer_path)
    on_disk = json.loads((model_dir / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert not list(model_dir.glob("*.partial"))
    assert result["format"] == "babydistill.eval" and result["tokens_hash"] == TokenStore(tiny_run.tokens_path).tokens_hash
    for split in ("validation", "test"):
        loss = result["loss"][split]
        assert loss["num_windows"] == min(8, TokenStore(tiny_run.tokens_path).num_windows(split))
        assert 0 < loss["ce"] < np.log(TokenStore(tiny_run.tokens_path).vocab_size)
        assert loss["perplexity"] == pytest.approx(np.exp(loss["ce"]))
    blimp = result["blimp"]
    assert blimp["num_pairs"] == 67 * 5 and blimp["num_paradigms"] == 67 and len(blimp["paradigms"]) == 67
    assert list(blimp["fields"]) == list(FIELDS)
    assert blimp["overall"] == pytest.approx(np.mean(list(blimp["paradigms"].values())))
    assert all(0 <= v <= 1 for v in blimp["paradigms"].values())
    assert set(result["seconds"]) == {"load", "loss", "blimp", "total"}

    # out= writes elsewhere and leaves the model folder alone
    elsewhere = tmp_path / "e.json"
    again = evaluate_model(tiny_run.eval, model_dir, tiny_run.tokens_path, tiny_run.tokenizer_path, out=elsewhere)
    assert json.loads(elsewhere.read_text())["blimp"]["paradigms"] == blimp["paradigms"]
    assert again["loss"] == result["loss"]

    # eval.blimp points at another BLiMP copy (a folder here)
    folder = tmp_path / "blimp_few"
    with zipfile.ZipFile(BUNDLED_BLIMP) as archive:
        for uid in PARADIGMS[:2]:
            archive.extract(f"blimp/{uid}.jsonl", folder)
    few = evaluate_model(dataclasses.replace(tiny_run.eval, blimp=str(folder)), model_dir, tiny_run.tokens_path,
                         tiny_run.tokenizer_path, out=tmp_path / "few.json")
    assert sorted(few["blimp"]["paradigms"]) == sorted(PARADIGMS[:2]) and few["blimp"]["num_pairs"] == 10
    assert few["blimp"]["source"] == str(folder)
    assert few["blimp"]["paradigms"] == {uid: blimp["paradigms"][uid] for uid in PARADIGMS[:2]}

    # the report reads what evaluate wrote
    report = write_report(run, tmp_path / "report")
    text = report.read_text()
    assert f"| t1 | teachers | {result['loss']['validation']['ce']:.3f} |" in text
    assert f"{100 * blimp['overall']:.1f}" in text
    assert (tmp_path / "report" / "curves.png").is_file()
