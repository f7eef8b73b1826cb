"""Sequence-to-sequence data: pairs of token sequences, source to target. Generated, so nothing is
downloaded: dates written in many human forms (CLDR's, through the ``babel`` package) to ISO 8601,
and SCAN's commands to actions (Lake and Baroni 2018, from its published grammar); T5's span
corruption of any text (its pretraining objective); the film reviews as text to text ("sentiment:
..." -> "fresh"); or the user's own pairs from a CSV file.

Each pair is one sample ``x`` of shape (2, length): row 0 the source ids, row 1 the decoder's input
(``<s>`` then the target); ``y`` is the target then ``</s>``, so the decoder learns each next token
under teacher forcing. Source and target share one vocabulary (as T5's do).
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData
from deepyard.data.text import Level, VocabSize, corpus_text, rotten_tomatoes_table, tokens
from deepyard.errors import DataError

BOS, EOS = "<s>", "</s>"
Density = Annotated[float, Field(gt=0.0, lt=0.5)]
SENTINEL = "<extra_id_{}>"  # T5's: the k-th corrupted span of a source, and where its tokens start in the target

# ---- SCAN: commands -> actions -------------------------------------------------------------------

PRIMITIVES = {"walk": "I_WALK", "look": "I_LOOK", "run": "I_RUN", "jump": "I_JUMP"}
TURNS = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}


def _verb_phrases() -> dict[str, list[str]]:
    """Every V of the grammar (34) and its actions: U, U left, turn left, U opposite left, U around left..."""
    phrases = {}
    for verb in [*PRIMITIVES, "turn"]:
        action = [PRIMITIVES[verb]] if verb in PRIMITIVES else []
        if action:
            phrases[verb] = action
        for direction, turn in TURNS.items():
            phrases[f"{verb} {direction}"] = [turn] + action
            phrases[f"{verb} opposite {direction}"] = [turn, turn] + action
            phrases[f"{verb} around {direction}"] = ([turn] + action) * 4
    return phrases


def scan_commands() -> dict[str, list[str]]:
    """All 20,910 SCAN commands and their action sequences: C -> S | S and S | S after S,
    S -> V | V twice | V thrice."""
    simple = {}
    for phrase, actions in _verb_phrases().items():
        simple[phrase] = actions
        simple[f"{phrase} twice"] = actions * 2
        simple[f"{phrase} thrice"] = actions * 3
    commands = dict(simple)
    for first, first_actions in simple.items():
        for second, second_actions in simple.items():
            commands[f"{first} and {second}"] = first_actions + second_actions
            commands[f"{first} after {second}"] = second_actions + first_actions
    return commands


@DATASETS.register("scan")
def scan(split: Literal["simple", "add_jump"] = "simple", split_seed: int = 0) -> RawData:
    """SCAN (Lake and Baroni 2018): navigation commands ("jump twice after walk left") to actions.
    ``simple``: a random 20% of the commands are the test split. ``add_jump``: training sees "jump"
    only alone, every other command with it is the test split (plain seq2seq models fail it)."""
    commands = scan_commands()
    names = sorted(commands)
    if split == "simple":
        test = set(np.random.default_rng(split_seed).permutation(len(names))[: len(names) // 5].tolist())
        held_out = [index in test for index in range(len(names))]
    else:
        held_out = [name != "jump" and "jump" in name.split() for name in names]
    train = [name for name, out in zip(names, held_out) if not out]
    test = [name for name, out in zip(names, held_out) if out]
    return pairs_data([name.split() for name in train], [commands[name] for name in train],
                      [name.split() for name in test], [commands[name] for name in test], join_with=" ")


# ---- dates: written forms -> ISO 8601 -----------------------------------------------------------

# Locales and CLDR formats whose written dates name one day each: every numeric form here puts the
# day before the month, so "4/12/26" (en_US's short form: April 12) is left out.
DATE_FORMS = [(locale, form) for locale in ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR")
              for form in ("short", "medium", "long", "full") if (locale, form) != ("en_US", "short")]
FIRST_DAY, LAST_DAY = datetime.date(1970, 1, 1), datetime.date(2039, 12, 31)  # (two-digit years read unambiguously)


def date_held_out(day: datetime.date, seed: int, fraction: float) -> bool:
    """Whether a day is a test day: a hash of the day and the seed, so no form of it is trained on."""
    digest = hashlib.blake2b(f"{seed}:{day.isoformat()}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64 < fraction


def written_dates(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (written date, ISO date) pairs: a random day and a random form each, from the seed."""
    from babel.dates import format_date

    rng = np.random.default_rng(seed)
    days = rng.integers(0, (LAST_DAY - FIRST_DAY).days + 1, size=count)
    forms = rng.integers(0, len(DATE_FORMS), size=count)
    pairs = []
    for offset, form in zip(days.tolist(), forms.tolist()):
        day = FIRST_DAY + datetime.timedelta(days=offset)
        locale, width = DATE_FORMS[form]
        pairs.append((format_date(day, format=width, locale=locale), day.isoformat()))
    return pairs


@DATASETS.register("dates")
def dates(samples: PositiveInt = 20000, test_fraction: float = 0.1, split_seed: int = 0) -> RawData:
    """Dates written as people write them (8 locales, CLDR's short to full forms: "jeudi 4 décembre
    2026", "4. Dez. 2026", "04/12/2026") to ISO 8601 ("2026-12-04"), as characters. The test split
    holds days that no training sample has, in any form."""
    pairs = written_dates(samples, split_seed)
    held_out = [date_held_out(datetime.date.fromisoformat(iso), split_seed, test_fraction) for _, iso in pairs]
    train = [pair for pair, out in zip(pairs, held_out) if not out]
    test = [pair for pair, out in zip(pairs, held_out) if out]
    return pairs_data([list(source) for source, _ in train], [list(target) for _, target in train],
                      [list(source) for source, _ in test], [list(target) for _, target in test], join_with="")


# ---- T5's pretraining: span corruption -----------------------------------------------------------

def _lengths(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` items cut at random into ``parts`` runs of at least one."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corrupted(words: list[str], density: float, mean_span: float,
                   rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """T5's span corruption of one window (Raffel et al. 2020, ``random_spans_noise_mask``): about
    ``density`` of the tokens, in spans of ``mean_span`` on average, each replaced in the source by
    the next sentinel; the target lists each sentinel and the tokens it hid, then a last sentinel."""
    hidden = min(max(round(len(words) * density), 1), len(words) - 1)
    spans = min(max(round(hidden / mean_span), 1), hidden, len(words) - hidden)
    source, target, at = [], [], 0
    for index, (kept, dropped) in enumerate(zip(_lengths(len(words) - hidden, spans, rng),
                                                _lengths(hidden, spans, rng))):
        source += words[at: at + kept] + [SENTINEL.format(index)]
        target += [SENTINEL.format(index)] + words[at + kept: at + kept + dropped]
        at += kept + dropped
    return source, target + [SENTINEL.format(spans)]


@DATASETS.register("span_corruption")
def span_corruption(corpus: list[str] | None = None, context_length: PositiveInt = 64, level: Level = "word",
                    noise_density: Density = 0.15, mean_span: PositiveFloat = 3.0,
                    min_count: PositiveInt = 2, max_vocab: VocabSize | None = 20000,
                    split_seed: int = 0) -> RawData:
    """T5's pretraining data: windows of ``context_length`` tokens of one or more corpora (as
    ``masked_text`` takes them: default shakespeare), each corrupted once (``span_corrupted``,
    seeded by the job's split seed) into a source with sentinels and the target that fills them."""
    words = tokens("\n\n".join(corpus_text(source) for source in corpus or ["shakespeare"]), level)
    if len(words) < 2 * context_length:
        raise DataError(f"the text has {len(words)} tokens; context_length {context_length} leaves fewer than "
                        "two windows")
    rng = np.random.default_rng(split_seed)
    pairs = [span_corrupted(words[start: start + context_length], noise_density, mean_span, rng)
             for start in range(0, len(words) - context_length + 1, context_length)]
    return pairs_data([source for source, _ in pairs], [target for _, target in pairs],
                      join_with="" if level == "char" else " ", min_count=min_count, max_vocab=max_vocab)


@DATASETS.register("rotten_tomatoes_pairs")
def rotten_tomatoes_pairs(max_length: PositiveInt = 48, min_count: PositiveInt = 2,
                          max_vocab: VocabSize | None = 20000) -> RawData:
    """rotten_tomatoes as text to text, T5's way of classifying: "sentiment : <snippet>" -> "fresh"
    or "rotten" (word tokens, the snippet cut to ``max_length``); exact match is accuracy."""
    table = rotten_tomatoes_table()
    table = table[table["category"].isin(["fresh", "rotten"])]
    sources = [["sentiment", ":"] + tokens(text, "word")[:max_length] for text in table["text"].astype(str)]
    return pairs_data(sources, [[label] for label in table["category"]], join_with=" ", min_count=min_count,
                      max_vocab=max_vocab)


@DATASETS.register("text_pairs_csv")
def text_pairs_csv(path: str, source: str = "source", target: str = "target", level: Level = "word",
                   max_length: PositiveInt = 64, min_count: PositiveInt = 1,
                   max_vocab: VocabSize | None = 30000) -> RawData:
    """The user's own pairs: a CSV file with a source column and a target column (text to text)."""
    from deepyard.data.table_files import read_table

    table = read_table(path, [source, target]).dropna(subset=[source, target])
    if table.empty:
        raise DataError(f"{path}: no rows with both a {source!r} and a {target!r} value")
    sources = [tokens(text, level)[:max_length] for text in table[source].astype(str)]
    targets = [tokens(text, level)[: max_length - 1] for text in table[target].astype(str)]
    return pairs_data(sources, targets, join_with="" if level == "char" else " ", min_count=min_count,
                      max_vocab=max_vocab)


def pairs_data(sources: list[list[str]], targets: list[list[str]], test_sources: list[list[str]] | None = None,
               test_targets: list[list[str]] | None = None, *, join_with: str, min_count: int = 1,
               max_vocab: int | None = None) -> RawData:
    """Token pairs as ``RawData``: x (n, 2, length) source and ``<s>`` + target ids, y the target and
    ``</s>`` (0 pads both); a test split when given."""
    every = sources + targets + (test_sources or []) + (test_targets or [])
    symbols = ["<pad>", "<unk>", BOS, EOS] + sorted({token for sequence in every for token in sequence} - {BOS, EOS})
    codes = {symbol: code for code, symbol in enumerate(symbols)}
    length = max(max(map(len, sources + (test_sources or []))), max(map(len, targets + (test_targets or []))) + 1)

    def encoded(source_lists: list[list[str]], target_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((len(source_lists), 2, length), dtype=np.int64)
        y = np.zeros((len(source_lists), length), dtype=np.int64)
        for row, (source, target) in enumerate(zip(source_lists, target_lists)):
            x[row, 0, : len(source)] = [codes[token] for token in source]
            x[row, 1, : len(target) + 1] = [codes[BOS]] + [codes[token] for token in target]
            y[row, : len(target) + 1] = [codes[token] for token in target] + [codes[EOS]]
        return x, y

    x, y = encoded(sources, targets)
    x_test, y_test = encoded(test_sources, test_targets) if test_sources else (None, None)
    return RawData(x, y, "seq2seq", x_test=x_test, y_test=y_test, symbols=symbols, min_count=min_count,
                   max_vocab=max_vocab, join_with=join_with)
