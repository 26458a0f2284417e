"""BabyLM zero-shot suites (eval.zero_shot): hand-made files of each format, scored by a bigram model
whose log-probabilities are written down here, against hand-computed answers; bad input; eval.json
and the report end to end."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY_CONFIG, write_config, write_corpus
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from babydistill.pipeline.config import Config, ConfigError, config_from_dict
from babydistill.pipeline.evaluate import completion_logprobs, evaluate_model, score_zero_shot
from babydistill.pipeline.model import build_model
from babydistill.pipeline.report import write_report
from babydistill.pipeline.zero_shot import Item, ZeroShotDataError, accuracy, load_suite
from babydistill.stores.tokens import TokenStore
from babydistill.workflows.cli import main
from babydistill.workflows.markers import STORE_MARKER, write_marker

# --- a model whose numbers can be worked out by hand ---------------------------------------

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "cats", "sleeps", "sleep", "rain", "sun", "fell", "shone",
         "ground", "is", "wet", "dry", "box", "contains", "red", "apple", "pear"]
# P(next | previous word); the rest of each row's mass is spread evenly over the other words
BIGRAMS = {
    "<s>": {"the": 0.6, "rain": 0.1, "sun": 0.1, "box": 0.1},
    "the": {"cat": 0.4, "cats": 0.2, "ground": 0.2, "apple": 0.1, "pear": 0.05},
    "cat": {"sleeps": 0.5, "sleep": 0.1},
    "cats": {"sleep": 0.2, "sleeps": 0.3},
    "rain": {"fell": 0.5}, "sun": {"shone": 0.5}, "fell": {"the": 0.5}, "shone": {"the": 0.5},
    "ground": {"is": 0.6}, "is": {"wet": 0.3, "dry": 0.2},
    "box": {"contains": 0.5}, "contains": {"the": 0.5, "red": 0.3, "apple": 0.15}, "red": {"apple": 0.3},
}
log = math.log


class BigramLM(torch.nn.Module):
    """logits[t] = log P(. | token t): the scorer's softmax gives back exactly the table's probabilities."""

    def __init__(self):
        super().__init__()
        index = {w: i for i, w in enumerate(WORDS)}
        table = torch.full((len(WORDS), len(WORDS)), 1.0 / len(WORDS), dtype=torch.float64)
        for previous, row in BIGRAMS.items():
            rest = (1.0 - sum(row.values())) / (len(WORDS) - len(row))
            table[index[previous]] = rest
            for word, p in row.items():
                table[index[previous], index[word]] = p
        self.log_p = torch.nn.Embedding.from_pretrained(table.log().float())

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.log_p(input_ids))


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the three formats, as the BabyLM 2025 data files hold them ----------------------------


def blimp_folder(root: Path) -> Path:
    folder = root / "blimp"
    write_jsonl(folder / "agreement.jsonl", [
        {"sentence_good": "the cat sleeps", "sentence_bad": "the cat sleep", "field": "morphology",
         "UID": "subject_verb_agreement", "linguistics_term": "s-v_agreement", "pairID": "0"},
        {"sentence_good": "the cats sleep", "sentence_bad": "the cats sleeps", "field": "morphology",
         "UID": "subject_verb_agreement", "linguistics_term": "s-v_agreement", "pairID": "1"}])
    # the supplement: no field, no UID -> the file stem is the paradigm
    write_jsonl(folder / "hypernym.jsonl", [{"sentence_good": "the cat sleeps", "sentence_bad": "the cats sleeps"}])
    return folder


def ewok_file(root: Path) -> Path:
    common = {"ContextType": "direct", "ContextDiff": "x", "TargetDiff": "y"}
    return write_jsonl(root / "ewok" / "physical.jsonl", [
        {"Domain": "physical-dynamics", "Context1": "rain fell", "Context2": "sun shone",
         "Target1": "the ground is wet", "Target2": "the ground is dry", **common},
        {"Domain": "physical-dynamics", "Context1": "sun shone", "Context2": "rain fell",
         "Target1": "the ground is dry", "Target2": "the ground is wet", **common},
        {"Domain": "material-properties", "Context1": "the box", "Context2": "the ground",
         "Target1": "contains the apple", "Target2": "contains the pear", **common}])


def entity_tracking_folder(root: Path) -> Path:
    folder = root / "entity_tracking"
    write_jsonl(folder / "regular.jsonl", [
        {"input_prefix": "box contains", "options": [" the apple", " the pear", " the cat"], "numops": 0},
        # sum, not mean: " red apple" has the better mean (log .3 per token) but the worse sum (log .09 < log .15)
        {"input_prefix": "box contains", "options": [" red apple", " apple"], "numops": 1},
        {"input_prefix": "box contains", "options": [" the apple", " the pear"], "numops": 1}])
    write_jsonl(folder / "ambiref.jsonl", [
        {"input_prefix": "box contains", "options": [" the pear", " the apple"], "numops": 0},
        {"input_prefix": "box contains", "options": [" the cat", " the pear"], "numops": 0}])
    return folder


def test_items_are_the_pipelines_strings(tmp_path):
    blimp = load_suite("blimp", blimp_folder(tmp_path))
    assert [(i.subset, i.group, i.candidates, i.starts) for i in blimp] == [
        ("subject_verb_agreement", "morphology", ("the cat sleeps", "the cat sleep"), (0, 0)),
        ("subject_verb_agreement", "morphology", ("the cats sleep", "the cats sleeps"), (0, 0)),
        ("hypernym", "supplement", ("the cat sleeps", "the cats sleeps"), (0, 0))]
    ewok = load_suite("ewok", ewok_file(tmp_path))
    # Context1 with each target; only " " + target is scored (starts at the space after Context1)
    assert ewok[0].candidates == ("rain fell the ground is wet", "rain fell the ground is dry")
    assert ewok[0].starts == (9, 9) and ewok[0].subset == "physical-dynamics"
    tracking = load_suite("entity_tracking", entity_tracking_folder(tmp_path))
    assert [i.subset for i in tracking] == ["ambiref_0_ops", "ambiref_0_ops", "regular_0_ops", "regular_1_ops",
                                            "regular_1_ops"]
    assert tracking[2].candidates == ("box contains the apple", "box contains the pear", "box contains the cat")
    assert tracking[2].starts == (12, 12, 12)


def test_scores_are_the_hand_computed_log_probabilities(tmp_path, word_tokenizer):
    model = BigramLM()
    texts = ["the cat sleeps", "rain fell the ground is wet", "box contains red apple", "box contains apple"]
    starts = [0, len("rain fell"), len("box contains"), len("box contains")]
    got = completion_logprobs(model, word_tokenizer, texts, starts, batch_size=3).tolist()
    expected = [log(0.6) + log(0.4) + log(0.5),                 # the whole sentence, the first word given <s>
                log(0.5) + log(0.2) + log(0.6) + log(0.3),       # the target only, its first word given "fell"
                log(0.3) + log(0.3),                             # the option's tokens, summed
                log(0.15)]
    assert got == pytest.approx(expected, abs=1e-5)


def test_accuracies_follow_the_babylm_rules(tmp_path, word_tokenizer):
    model = BigramLM()
    # BLiMP: right, wrong (P(sleeps|cats) .3 > P(sleep|cats) .2), right; overall = mean over paradigms
    items = load_suite("blimp", blimp_folder(tmp_path))
    correct = score_zero_shot(model, word_tokenizer, items, batch_size=2)
    assert correct == [True, False, True]
    acc = accuracy("blimp", items, correct)
    assert acc["subsets"] == {"hypernym": 1.0, "subject_verb_agreement": 0.5}
    assert acc["overall"] == pytest.approx(0.75)  # not 2/3: paradigms weigh the same, not items
    assert acc["fields"] == {"morphology": 0.5, "supplement": 1.0}

    # EWoK: wet .3 > dry .2 (right), the same bigram after "shone" (wrong), apple .1 > pear .05 (right)
    items = load_suite("ewok", ewok_file(tmp_path))
    correct = score_zero_shot(model, word_tokenizer, items, batch_size=4)
    assert correct == [True, False, True]
    acc = accuracy("ewok", items, correct)
    assert acc["subsets"] == {"material-properties": 1.0, "physical-dynamics": 0.5}
    assert acc["overall"] == pytest.approx(0.75)

    # entity tracking: ambiref pear<apple (wrong), cat>pear (right); regular cat beats apple (wrong),
    # " apple" sums higher than " red apple" (wrong), apple>pear (right)
    items = load_suite("entity_tracking", entity_tracking_folder(tmp_path))
    correct = score_zero_shot(model, word_tokenizer, items, batch_size=5)
    assert correct == [False, True, False, False, True]
    acc = accuracy("entity_tracking", items, correct)
    assert acc["subsets"] == {"ambiref_0_ops": 0.5, "regular_0_ops": 0.0, "regular_1_ops": 0.5}
    assert acc["splits"] == {"ambiref": 0.5, "regular": 0.25}
    assert acc["overall"] == pytest.approx(0.375)  # mean over splits of the mean over their subsets


def test_a_tie_goes_to_the_first_candidate(word_tokenizer):
    item = Item("s", ("box contains the apple", "box contains the apple"), (12, 12))
    assert score_zero_shot(BigramLM(), word_tokenizer, [item], batch_size=2) == [True]


def test_entity_tracking_file_outside_the_known_splits_is_its_own_split(tmp_path):
    folder = tmp_path / "et"
    write_jsonl(folder / "custom.jsonl", [{"input_prefix": "a", "options": [" b", " c"], "numops": 2}])
    items = load_suite("entity_tracking", folder)
    assert accuracy("entity_tracking", items, [True]) == {"splits": {"custom": 1.0}, "overall": 1.0,
                                                          "subsets": {"custom_2_ops": 1.0}}


# --- bad input: one line naming the file (and line, or the fields it lacks) ------------------


def test_bad_files_are_refused_with_one_line(tmp_path):
    with pytest.raises(ZeroShotDataError, match="no such file or folder"):
        load_suite("blimp", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZeroShotDataError, match=r"empty: no \*.jsonl files"):
        load_suite("ewok", tmp_path / "empty")
    bad = write_jsonl(tmp_path / "bad" / "x.jsonl", [{"sentence_good": "a", "sentence_bad": "b"}, "{not json"])
    with pytest.raises(ZeroShotDataError, match=f"{bad}:2: not a JSON line"):
        load_suite("blimp", bad)
    # a BLiMP file given as EWoK: the message names the file and every field it lacks
    with pytest.raises(ZeroShotDataError) as info:
        load_suite("ewok", blimp_folder(tmp_path))
    message = str(info.value)
    assert "agreement.jsonl: line 1 lacks Context1, Target1, Target2, Domain" in message and "\n" not in message
    numbers = write_jsonl(tmp_path / "numbers" / "b.jsonl", [{"sentence_good": "a", "sentence_bad": 3}])
    with pytest.raises(ZeroShotDataError, match=f"{numbers}:1: sentence_bad must be text"):
        load_suite("blimp", numbers)
    odd = write_jsonl(tmp_path / "odd" / "e.jsonl", [{"input_prefix": "a", "options": "b", "numops": 0}])
    with pytest.raises(ZeroShotDataError, match=f"{odd}:1: `options` must be a list"):
        load_suite("entity_tracking", odd)


def test_config_refuses_bad_entries():
    def eval_section(entries):
        return config_from_dict({"eval": {"zero_shot": entries}})

    assert eval_section([{"task": "ewok", "path": "e"}]).eval.zero_shot == [{"task": "ewok", "path": "e"}]
    with pytest.raises(ConfigError, match=r"eval.zero_shot\[0\].task: must be one of blimp, ewok, entity_tracking"):
        eval_section([{"task": "glue", "path": "x"}])
    with pytest.raises(ConfigError, match=r"eval.zero_shot\[0\]: needs `task` and `path`"):
        eval_section([{"task": "blimp"}])
    with pytest.raises(ConfigError, match=r"eval.zero_shot\[0\].file: unknown key"):
        eval_section([{"task": "blimp", "path": "x", "file": "y"}])
    with pytest.raises(ConfigError, match=r"eval.zero_shot\[1\]: a second suite named 'blimp'"):
        eval_section([{"task": "blimp", "path": "x"}, {"task": "blimp", "path": "y"}])
    assert len(eval_section([{"task": "blimp", "path": "x"},
                             {"task": "blimp", "path": "y", "name": "supplement"}]).eval.zero_shot) == 2
    with pytest.raises(ConfigError, match=r"eval.zero_shot\[0\]: must be a mapping"):
        eval_section(["blimp"])


def test_an_unused_zero_shot_key_keeps_old_fingerprints():
    """Runs made before eval.zero_shot existed stay up to date; setting it makes evaluations stale."""
    plain = Config()
    assert "zero_shot" not in json.dumps(plain.section_hash("eval"))
    with_suites = config_from_dict({"eval": {"zero_shot": [{"task": "ewok", "path": "e"}]}})
    assert with_suites.section_hash("eval") != plain.section_hash("eval")


# --- end to end: evaluate writes per-task and per-subset accuracies; the report has a column each ---


@pytest.fixture
def scored_run(tiny_run, tmp_path) -> tuple[Path, Path, Config]:
    """A copy of the tiny run with one untrained teacher checkpoint and a config of three suites."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_path, run_dir, ignore=shutil.ignore_patterns("teachers", "students", "data"))
    write_marker(run_dir / "tokens.zarr" / STORE_MARKER, {"fingerprint": "test"})  # what `tokenize` leaves
    model_dir = run_dir / "teachers" / "t1"
    build_model(tiny_run, TokenStore(run_dir / "tokens.zarr"), seed=1).save_pretrained(model_dir)
    for file in (run_dir / "tokenizer").iterdir():
        shutil.copy(file, model_dir / file.name)
    raw = {section: dict(values) for section, values in TINY_CONFIG.items()}
    raw["run_dir"] = str(run_dir)
    raw["eval"]["zero_shot"] = [{"task": "blimp", "path": str(blimp_folder(tmp_path / "data"))},
                                {"task": "ewok", "path": str(ewok_file(tmp_path / "data"))},
                                {"task": "entity_tracking", "path": str(entity_tracking_folder(tmp_path / "data"))}]
    config_path = tmp_path / "suites.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return config_path, model_dir, config_from_dict(raw)


def test_evaluate_writes_suites_and_report_columns(scored_run, tmp_path):
    config_path, model_dir, config = scored_run
    result = evaluate_model(config.eval, model_dir, config.tokens_path, config.tokenizer_path)
    on_disk = json.loads((model_dir / "eval.json").read_text())
    assert list(on_disk["zero_shot"]) == ["blimp", "ewok", "entity_tracking"]
    blimp, ewok, tracking = (on_disk["zero_shot"][k] for k in ("blimp", "ewok", "entity_tracking"))
    assert blimp["task"] == "blimp" and blimp["num_items"] == 3 and blimp["num_subsets"] == 2
    assert set(blimp["subsets"]) == {"subject_verb_agreement", "hypernym"}
    assert set(blimp["fields"]) == {"morphology", "supplement"}
    assert set(ewok["subsets"]) == {"physical-dynamics", "material-properties"} and ewok["num_items"] == 3
    assert set(tracking["splits"]) == {"regular", "ambiref"} and tracking["num_items"] == 5
    for suite in (blimp, ewok):
        assert suite["overall"] == pytest.approx(sum(suite["subsets"].values()) / suite["num_subsets"])
    assert tracking["overall"] == pytest.approx(sum(tracking["splits"].values()) / 2)
    assert "zero_shot" in result["seconds"] and result["blimp"]["num_pairs"] == 67 * 5  # the bundled BLiMP too

    text = write_report(config, tmp_path / "report").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert header.endswith("| blimp | ewok | entity_tracking |")
    row = next(line for line in text.splitlines() if line.startswith("| t1 |"))
    assert row.endswith(f"| {100 * blimp['overall']:.1f} | {100 * ewok['overall']:.1f} | "
                        f"{100 * tracking['overall']:.1f} |")
    assert "BabyLM zero-shot suites" in text


@pytest.mark.parametrize("breakage, message", [
    ("missing", "no such file or folder"),
    ("empty", r"no \*.jsonl files"),
    ("not_json", r"entity_tracking/regular.jsonl:2: not a JSON line"),
    ("wrong_task", "lacks Context1, Target1, Target2, Domain"),
    ("unknown_task", r"eval.zero_shot\[1\].task: must be one of"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(scored_run, tmp_path, capsys, breakage, message):
    config_path, model_dir, _ = scored_run
    raw = yaml.safe_load(config_path.read_text())
    suites = raw["eval"]["zero_shot"]
    if breakage == "missing":
        suites[1]["path"] = str(tmp_path / "nowhere")
    elif breakage == "empty":
        (tmp_path / "empty").mkdir()
        suites[1]["path"] = str(tmp_path / "empty")
    elif breakage == "not_json":
        regular = Path(suites[2]["path"]) / "regular.jsonl"
        regular.write_text(regular.read_text().splitlines()[0] + "\n{oops\n", encoding="utf-8")
    elif breakage == "wrong_task":
        suites[1]["path"] = suites[0]["path"]
    else:
        suites[1]["task"] = "glue"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    before = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*"))

    assert main(["evaluate", str(config_path), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("babydistill: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*")) == before


def test_run_checks_the_suites_before_any_stage(tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    path = write_config(tmp_path, {"eval": {"zero_shot": [{"task": "ewok", "path": str(tmp_path / "nowhere")}]}})
    assert main(["run", str(path)]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
