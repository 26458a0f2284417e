"""Stage `tokenizer`: byte-level BPE trained on the train split only.

Saved as a Hugging Face fast tokenizer, so ``AutoTokenizer.from_pretrained(run_dir/tokenizer)``
loads it unchanged. Special tokens: ``<pad>`` (0), ``<s>`` begin of document (1), ``</s>`` end
of document (2). Encoding a text with the saved tokenizer prepends ``<s>``, as every document
in the token store starts with it (BLiMP scoring conditions the first word on it).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from babydistill.pipeline.config import TokenizerConfig
from babydistill.pipeline.prepare import split_documents
from babydistill.stores.tokens import tokenizer_file_hash

PAD, BOS, EOD = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOD]


class TokenizerError(ValueError):
    """The tokenizer cannot be trained or loaded as asked."""


def build_bpe(documents: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its Rust bar writes to the terminal past our stage logs and leaves blank lines
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def train_tokenizer(cfg: TokenizerConfig, train_dir: Path, out_dir: Path) -> Path:
    """Train byte-level BPE on the documents under ``train_dir`` and save it in ``out_dir``."""
    documents = split_documents(train_dir.parent, train_dir.name)
    if not documents:
        raise TokenizerError(f"{train_dir}: no training text; run `babydistill prepare CONFIG` first")
    tokenizer = build_bpe(documents, cfg.vocab_size, cfg.min_frequency)
    learned = tokenizer.get_vocab_size()
    if learned < cfg.vocab_size:
        raise TokenizerError(
            f"corpus too small for tokenizer.vocab_size={cfg.vocab_size}: BPE found only {learned} tokens "
            f"in {train_dir}; lower tokenizer.vocab_size to at most {learned} or add text")
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOD, pad_token=PAD,
                                 clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return out_dir


def tokenizer_hash(tokenizer_dir: Path) -> str:
    """Content hash of tokenizer.json: what stores record to refuse a different tokenizer."""
    digest = tokenizer_file_hash(tokenizer_dir)
    if digest is None:
        raise TokenizerError(f"{tokenizer_dir}: no tokenizer.json; run `babydistill tokenizer CONFIG` first")
    return digest


def load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    tokenizer_hash(tokenizer_dir)  # a clear error when it is missing
    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
