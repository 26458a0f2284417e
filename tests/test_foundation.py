"""Config, prepare, tokenizer, tokenize and the runner: end to end on a tiny corpus, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_config, write_corpus

from babydistill.pipeline.config import ConfigError, load_config
from babydistill.pipeline.prepare import clean_documents, find_splits, prepare_corpus
from babydistill.stores.tokens import TokenStore
from babydistill.workflows.cli import build_parser, main


def run_cli(*args) -> int:
    return main([str(a) for a in args])


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ({"train": {"bogus": 1}}, "train.bogus: unknown key"),
    ({"bogus_section": {}}, "bogus_section: unknown key"),
    ({"train": {"lr": "fast"}}, "train.lr: must be a number"),
    ({"train": {"epochs": 1.5}}, "train.epochs: must be an integer"),
    ({"train": {"lr": -1}}, "train.lr: must be > 0"),
    ({"data": {"seq_len": 1}}, "data.seq_len: must be >= 2"),
    ({"tokenizer": {"vocab_size": 70000}}, "tokenizer.vocab_size: must be <= 65536"),
    ({"model": {"num_heads": 5}}, "model.num_heads: must divide model.hidden_size"),
    ({"model": {"num_kv_heads": 3}}, "model.num_kv_heads: must divide model.num_heads"),
    ({"distill": {"alpha": 1.5}}, "distill.alpha: must be in [0, 1]"),
    ({"distill": {"temperature": 0}}, "distill.temperature: must be > 0"),
    ({"cache": {"temperatures": [1.0, -2.0]}}, "cache.temperatures"),
    ({"cache": {"mode": "dense"}}, "cache.mode: must be one of topk, sample"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, override, message, capsys):
    path = write_config(tmp_path, override)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)
    assert run_cli("prepare", path) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message.split(":")[0] in err
    assert not (tmp_path / "run").exists()


def test_set_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write_config(tmp_path)
    config = load_config(path, ["cache.temperatures=[1, 2, 4]", "train.lr=1e-3", "run_dir=elsewhere"])
    assert config.cache.temperatures == [1.0, 2.0, 4.0]
    assert config.train.lr == 1e-3 and config.run_dir == "elsewhere"
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(path, ["train.nope=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["train.lr"])


def test_sequence_normalisation_defaults_to_the_bigger_store_where_the_config_leaves_it_out(tmp_path):
    path = write_config(tmp_path, {"cache": {"mode": "hybrid", "chunk_windows": 4}})
    raw = yaml.safe_load(path.read_text())
    del raw["cache"]["k"]  # no k, no samples
    path.write_text(yaml.safe_dump(raw))
    token = load_config(path)
    assert (token.cache.k, token.cache.samples) == (8, 12)  # the CacheConfig defaults
    sequence = load_config(path, ["distill.normalization=sequence"])
    assert (sequence.cache.k, sequence.cache.samples) == (32, 64)
    assert sequence.section_hash("cache") != token.section_hash("cache")  # another store, so a rebuild
    # what the config or --set names wins, key by key
    assert load_config(path, ["distill.normalization=sequence", "cache.k=8"]).cache.k == 8
    assert load_config(path, ["distill.normalization=sequence", "cache.k=8"]).cache.samples == 64
    named = write_config(tmp_path, {"cache": {"mode": "hybrid", "k": 8, "samples": 12},
                                    "distill": {"normalization": "sequence"}}, name="named")
    assert (load_config(named).cache.k, load_config(named).cache.samples) == (8, 12)
    assert load_config(path, ["distill.normalization=sequence", "cache=null"]).cache.k == 32  # an empty section
    assert load_config(path, ["distill=null"]).cache.k == 8  # token normalisation, the default
    # a cache section that is not a mapping is still named as the problem
    with pytest.raises(ConfigError, match="cache: must be a mapping"):
        load_config(path, ["distill.normalization=sequence", "cache=12"])


def test_shipped_configs_load_and_size_the_paper_models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(__file__).resolve().parents[1] / "configs"
    sizes = {}
    for name in ("demo", "small-16m", "babyllama2-345m"):
        config = load_config(root / f"{name}.yaml")
        m = config.model
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=config.tokenizer.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                tie_word_embeddings=m.tie_embeddings))
        sizes[name] = sum(p.numel() for p in model.parameters()) / 1e6
    assert 15.5 < sizes["small-16m"] < 17.5
    assert 340 < sizes["babyllama2-345m"] < 350


def test_every_shipped_config_and_study_file_loads():
    """A config or study file in configs/ that names an unknown key, a bad value or a missing protocol fails here,
    not hours into a run on someone's machine."""
    from babydistill.workflows.experiments.study_spec import load_study

    root = Path(__file__).resolve().parents[1] / "configs"
    studies = []
    for path in sorted(root.glob("*.yaml")):
        if "arms" in yaml.safe_load(path.read_text(encoding="utf-8")):
            study = load_study(path)
            studies.append(path.stem)
            assert study.protocol is None or study.protocol.is_file(), path
        else:
            load_config(path)
    assert {"claim-study", "vocab-study", "quant-study", "temper-study"} <= set(studies)


def test_every_verb_has_help(capsys):
    parser = build_parser()
    for verb in ("prepare", "tokenizer", "tokenize", "teacher", "cache", "distill", "evaluate", "report", "run",
                 "status", "store", "bench"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([verb, "--help"])
        assert exc.value.code == 0
        assert "usage: babydistill " + verb in capsys.readouterr().out


# --- prepare --------------------------------------------------------------------------------


def test_cleaning_normalises_whitespace_and_keeps_documents():
    text = "\ufeffOne  two\r\n\tthree \r\n\r\n\r\n  \nFour\u00a0five\n\n"
    assert clean_documents(text) == ["One two\nthree", "Four five"]


def _babylm(root: Path, train: str, held_out: dict[str, str]) -> Path:
    """A BabyLM-style corpus: ``train/*.train`` and the held-out files (path under ``root``: text)."""
    write_corpus(root / train, num_files=2)
    for p in (root / train).glob("*.txt"):
        p.rename(p.with_suffix(".train"))
    for name, text in held_out.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _babylm_2024(root: Path) -> Path:
    return _babylm(root, "train_10M", {"dev/childes.dev": "A dev line.\n\nAnother dev paragraph.\n",
                                       "test/childes.test": "Hidden test.\n"})


def _babylm_2023(root: Path) -> Path:
    return _babylm(root, "babylm_10M", {"babylm_dev/bnc.dev": "A dev line.\n"})


def _presplit(root: Path) -> Path:
    write_corpus(root / "train", num_files=2)
    write_corpus(root / "validation", num_files=1, paragraphs=5, seed=1)
    write_corpus(root / "test", num_files=1, paragraphs=5, seed=2)
    return root


@pytest.mark.parametrize(("make", "layout", "test_words"), [
    (_babylm_2024, "babylm", 6), (_babylm_2023, "babylm", 3), (_presplit, "pre-split", None),
    (lambda root: write_corpus(root, num_files=2), "plain", None)])
def test_prepare_understands_each_layout(tmp_path, make, layout, test_words):
    corpus = make(tmp_path / "corpus")
    config = load_config(write_config(tmp_path))
    splits, found = find_splits(corpus, config.data)
    assert found.startswith(layout)
    assert all(any(s.documents for s in splits[name]) for name in ("train", "validation", "test"))
    if test_words is not None:  # BabyLM: the dev folder is the test set, as in the paper
        assert sum(s.num_words for s in splits["test"]) == test_words


def test_prepare_split_is_deterministic_contiguous_and_complete(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", num_files=2)
    config = load_config(write_config(tmp_path))
    first = prepare_corpus(config.data, corpus, tmp_path / "a")
    second = prepare_corpus(config.data, corpus, tmp_path / "b")
    assert first["splits"] == second["splits"]
    for name in ("source0", "source1"):
        original = clean_documents((corpus / f"{name}.txt").read_text())
        parts = [(tmp_path / "a" / split / f"{name}.txt").read_text().strip().split("\n\n")
                 for split in ("train", "validation", "test")]
        assert parts[0] + parts[1] + parts[2] == original  # contiguous, nothing lost or repeated
    words = {k: v["words"] for k, v in first["splits"].items()}
    assert 0.05 < words["validation"] / sum(words.values()) < 0.15


def test_max_train_words_keeps_a_share_of_every_source(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", num_files=3)
    config = load_config(write_config(tmp_path, {"data": {"max_train_words": 600}}))
    manifest = prepare_corpus(config.data, corpus, tmp_path / "out")
    assert 550 <= manifest["splits"]["train"]["words"] <= 700
    assert len(manifest["splits"]["train"]["files"]) == 3


# --- the stages through the CLI -----------------------------------------------------------------


def test_stages_end_to_end_skip_and_refuse_changed_inputs(tiny_config_path, capsys):
    from transformers import AutoTokenizer

    config = load_config(tiny_config_path)
    assert run_cli("tokenize", tiny_config_path) == 2
    assert "run `babydistill tokenizer CONFIG` first" in capsys.readouterr().err
    for verb in ("prepare", "tokenizer", "tokenize"):
        assert run_cli(verb, tiny_config_path) == 0
    run_dir = config.run_path
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["manifest.json", "stage.json", "test", "train",
                                                                   "validation"]
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "validation", "test"} and len(manifest["splits"]["train"]["sha256"]) == 64

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    assert len(tokenizer) == 400 and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    ids = tokenizer("Once upon a time the cat saw the dog.").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "Once upon a time the cat saw the dog."

    store = TokenStore(run_dir / "tokens.zarr")
    stream = store.stream("train")
    assert stream.dtype == np.uint16 and store.seq_len == 32
    assert stream[0] == tokenizer.bos_token_id and stream[-1] == tokenizer.eos_token_id
    assert (stream == tokenizer.bos_token_id).sum() == (stream == tokenizer.eos_token_id).sum() == \
        manifest["splits"]["train"]["documents"]
    windows = store.windows("train", [0, 1])
    assert windows.shape == (2, 33) and windows[0, -1] == windows[1, 0]
    assert np.array_equal(windows[1], stream[32:65])
    assert store.num_windows("train") == (len(stream) - 1) // 32

    capsys.readouterr()
    assert run_cli("tokenize", tiny_config_path) == 0
    assert "[skip] tokenize" in capsys.readouterr().out
    assert run_cli("tokenize", tiny_config_path, "--set", "data.seq_len=16") == 2
    assert "--force" in capsys.readouterr().err
    assert TokenStore(run_dir / "tokens.zarr").seq_len == 32  # untouched
    assert run_cli("tokenize", tiny_config_path, "--set", "data.seq_len=16", "--force") == 0
    assert TokenStore(run_dir / "tokens.zarr").seq_len == 16
    assert not list(run_dir.glob("*.partial")) and not list(run_dir.glob("*.old"))


def test_status_says_what_is_done(tiny_config_path, capsys):
    run_cli("prepare", tiny_config_path)
    capsys.readouterr()
    assert run_cli("status", tiny_config_path) == 0
    out = capsys.readouterr().out
    assert "done        prepare" in out
    assert "todo        tokenizer" in out
    assert "waiting     tokenize" in out and "run `babydistill tokenizer CONFIG` first" in out


def test_a_run_moved_with_its_corpus_stays_up_to_date(tmp_path, capsys):
    """The prepare fingerprint holds the corpus's contents, not its path or mtimes: a run directory copied
    elsewhere with its corpus is still done. Runs made with the earlier fingerprint stay done where they are."""
    import shutil

    from babydistill.pipeline.config import identity
    from babydistill.workflows.markers import write_marker
    from babydistill.workflows.runner import (
        _corpus_listing,
        fingerprint,
        prepare_stage,
        stage_status,
    )

    first = tmp_path / "first"
    write_corpus(first / "corpus")
    assert run_cli("prepare", write_config(first)) == 0
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)  # new path, new mtimes, the same bytes
    config = load_config(write_config(moved))
    assert stage_status(prepare_stage(config))[0] == "done"
    # A marker written by the earlier formula (path + mtimes) is up to date in place, as before.
    record = json.loads((moved / "run/data/stage.json").read_text())
    recipe = [v for k, v in identity(config.data).items() if k not in ("corpus", "seq_len")]
    record["fingerprint"] = fingerprint("prepare", str(config.corpus_path.resolve()), *recipe,
                                        _corpus_listing(config.corpus_path))
    write_marker(moved / "run/data/stage.json", record)
    assert stage_status(prepare_stage(config))[0] == "done"
    # Changed contents are still a change.
    (moved / "corpus" / "source0.txt").write_text("Something else entirely.\n", encoding="utf-8")
    assert stage_status(prepare_stage(config))[0] == "stale"


# --- bad input: one line, non-zero exit, nothing damaged -------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("babydistill: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_and_empty_corpus(tmp_path, capsys):
    path = write_config(tmp_path)  # no corpus written
    assert run_cli("prepare", path) == 2
    assert "corpus folder not found" in _error_line(capsys)
    (tmp_path / "corpus").mkdir()
    assert run_cli("prepare", path) == 2
    assert "no corpus files found" in _error_line(capsys)
    assert not (tmp_path / "run" / "data").exists()


def test_non_utf8_file_is_named_with_its_byte_offset_and_nothing_is_damaged(tiny_config_path, capsys):
    config = load_config(tiny_config_path)
    assert run_cli("prepare", tiny_config_path) == 0
    before = (config.data_path / "manifest.json").read_text()
    (config.corpus_path / "latin1.txt").write_bytes(b"Caf\xe9 au lait.\n")
    capsys.readouterr()
    assert run_cli("prepare", tiny_config_path, "--force") == 2
    err = _error_line(capsys)
    assert "latin1.txt: not UTF-8" in err and "byte offset 3" in err
    assert (config.data_path / "manifest.json").read_text() == before


def test_corpus_too_small_for_vocab(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", num_files=2, paragraphs=30)
    path = write_config(tmp_path, {"tokenizer": {"vocab_size": 5000}})
    assert run_cli("prepare", path) == 0
    capsys.readouterr()
    assert run_cli("tokenizer", path) == 2
    err = _error_line(capsys)
    assert "corpus too small for tokenizer.vocab_size=5000" in err and "lower tokenizer.vocab_size" in err
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_vocab_over_uint16_and_short_seq_len_are_refused(tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    assert run_cli("prepare", write_config(tmp_path, {"tokenizer": {"vocab_size": 65537}})) == 2
    assert "uint16" in _error_line(capsys)
    assert run_cli("prepare", write_config(tmp_path, {"data": {"seq_len": 1}})) == 2
    assert "data.seq_len: must be >= 2" in _error_line(capsys)


def test_interrupted_stage_leaves_no_finished_looking_output(tiny_config_path, monkeypatch):
    import babydistill.pipeline.prepare as prepare

    config = load_config(tiny_config_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "prepare_corpus", crash)
    assert run_cli("prepare", tiny_config_path) == 130
    assert not config.data_path.exists() and (config.run_path / "data.partial").exists()
    monkeypatch.undo()
    assert run_cli("prepare", tiny_config_path) == 0
    assert (config.data_path / "stage.json").exists() and not (config.run_path / "data.partial").exists()


def test_execution_only_keys_do_not_change_stage_fingerprints(tmp_path):
    base = load_config(write_config(tmp_path))
    faster = load_config(write_config(tmp_path), ["train.num_threads=2", "train.log_every=7", "cache.workers=2"])
    assert base.section_hash("model", "train", "cache") == faster.section_hash("model", "train", "cache")
    other = load_config(write_config(tmp_path), ["train.lr=0.1"])
    assert base.section_hash("model", "train") != other.section_hash("model", "train")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_token_chunk_is_named_refused_and_rebuilt_by_tokenize(tiny_config_path, capsys, damage):
    from babydistill.stores.tokens import TokenStoreError

    for verb in ("prepare", "tokenizer", "tokenize"):
        assert run_cli(verb, tiny_config_path) == 0
    tokens = load_config(tiny_config_path).tokens_path
    files = sorted(p.relative_to(tokens).as_posix() for p in tokens.rglob("c/*") if p.is_file())
    original = {rel: (tokens / rel).read_bytes() for rel in files}
    capsys.readouterr()
    assert run_cli("store", "verify", tokens) == 0
    for rel in ("train/tokens/c/0", "validation/windows/c/0"):
        file = tokens / rel
        if damage == "flip":
            data = bytearray(file.read_bytes())
            data[len(data) // 2] ^= 0x10
            file.write_bytes(bytes(data))
        elif damage == "truncate":
            file.write_bytes(file.read_bytes()[:-2])
        else:
            file.unlink()
        why = "is missing" if damage == "delete" else "changed since it was written (crc32)"
        capsys.readouterr()
        assert run_cli("store", "verify", tokens) == 1
        out, err = capsys.readouterr()
        assert f"FAIL {rel} {why}" in out and "`babydistill tokenize CONFIG`" in err
        split = rel.split("/")[0]
        with pytest.raises(TokenStoreError) as refused:
            TokenStore(tokens).windows(split, [0])
        assert str(refused.value) == f"{tokens}: {rel} {why}; rebuild it with `babydistill tokenize CONFIG`"
        assert run_cli("status", tiny_config_path) == 0
        assert "incomplete  tokenize" in capsys.readouterr().out
        assert run_cli("tokenize", tiny_config_path) == 0
        assert "[run ] tokenize" in capsys.readouterr().out
        assert {rel: (tokens / rel).read_bytes() for rel in files} == original
        assert run_cli("store", "verify", tokens) == 0
    # the stage marker is a zarr node: plain zarr walks the store without a warning
    assert (tokens / "_stage" / "zarr.json").is_file() and not (tokens / "stage.json").exists()
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = [name for name, _ in zarr.open_group(str(tokens), mode="r").members(max_depth=None)]
    assert {"train/tokens", "train/windows", "_stage"} <= set(names)


def test_a_stale_stage_names_its_own_rebuild_command_and_a_stale_report_is_rebuilt(tmp_path):
    """`run --force` would rebuild every stage, so a stale one names the command that rebuilds it alone;
    the report (made from the other outputs in seconds) is rebuilt when stale, without asking."""
    from babydistill.workflows.stage import Stage, StageError, run_stage, stage_status

    def stage(name: str, fingerprint: str, derived: bool = False) -> Stage:
        return Stage(name, tmp_path / name, fingerprint, lambda work: (work / "out.txt").write_text(fingerprint),
                     f"babydistill {name} CONFIG", derived=derived)

    for name, derived in (("teacher", False), ("report", True)):
        assert run_stage(stage(name, "a", derived))
    state, why = stage_status(stage("teacher", "b"))
    assert state == "stale" and "`babydistill teacher CONFIG --force` (with the same --set options) rebuilds it" in why
    with pytest.raises(StageError, match="babydistill teacher CONFIG --force"):
        run_stage(stage("teacher", "b"))
    assert (tmp_path / "teacher" / "out.txt").read_text() == "a"  # refused: nothing rewritten
    assert "`babydistill report CONFIG` (with the same --set options) rebuilds it" in stage_status(stage("report", "b", derived=True))[1]
    assert run_stage(stage("report", "b", derived=True))
    assert (tmp_path / "report" / "out.txt").read_text() == "b"
