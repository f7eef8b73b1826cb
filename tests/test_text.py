"""Text: tokenization and vocabularies without leakage, the transformers, the language-model task,
and the text payloads of a served model. Fast: no Ray here (the end-to-end runs are in
test_zoo_jobs.py)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from deepyard.data import load_splits, make_splits
from deepyard.data.splits import PAD, UNK
from deepyard.data.text import decode, encode, labelled_texts, language_model_windows
from deepyard.errors import DataError
from deepyard.models import MODELS
from deepyard.serve.payloads import BadRequest
from deepyard.tasks.classification import Classification
from deepyard.tasks.language_model import LanguageModel
from deepyard.tasks.language_model import generate


def decoder(vocab_size: int = 12, steps: int = 10, **params):
    torch.manual_seed(0)
    return MODELS.build("transformer_decoder", {"width": 32, "layers": 2, "heads": 4, "dropout": 0.0, **params},
                        in_shape=(steps,), num_outputs=vocab_size, vocab_size=vocab_size)


def encoder(vocab_size: int = 12, steps: int = 10, **params):
    torch.manual_seed(0)
    return MODELS.build("transformer_encoder", {"width": 32, "layers": 2, "heads": 4, "dropout": 0.0, **params},
                        in_shape=(steps,), num_outputs=3, vocab_size=vocab_size)


def test_decoder_is_causal_changing_later_tokens_never_changes_earlier_logits():
    model = decoder().eval()
    ids = torch.randint(2, 12, (4, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(2, 12, (4, 4))
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert before.shape == (4, 10, 12)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_decoder_ties_its_output_layer_to_the_embedding_unless_told_not_to():
    tied, untied = decoder(), decoder(tie_weights=False)
    assert tied.head.weight is tied.embeddings.tokens.weight
    assert untied.head.weight is not untied.embeddings.tokens.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 12 * 32


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_ignores_padding(pooling):
    model = encoder(pooling=pooling).eval()
    with torch.no_grad():
        padded = model(torch.tensor([[5, 6, 7] + [PAD] * 7]))
        unpadded = model(torch.tensor([[5, 6, 7]]))  # the same text with no padding at all
        other_tokens = model(torch.tensor([[5, 6, 8] + [PAD] * 7]))
    assert padded.shape == (1, 3)
    torch.testing.assert_close(padded, unpadded)
    assert not torch.allclose(padded, other_tokens)


@pytest.mark.parametrize("name", ["transformer_encoder", "transformer_decoder"])
def test_transformers_learn_a_tiny_problem(name):
    torch.manual_seed(0)
    ids = torch.randint(2, 12, (32, 10))
    if name == "transformer_decoder":
        model, targets = decoder(), torch.roll(ids, -1, dims=1)  # predict the next token (cyclic)
        task = LanguageModel()
    else:
        from deepyard.tasks import Classification

        model, targets, task = encoder(), (ids[:, 0] % 3), Classification(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = task.loss(model(ids), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_context_longer_than_the_models_is_refused():
    with pytest.raises(ValueError, match="sequences have 10 tokens but the model's context_length is 8"):
        decoder(context_length=8)
    with pytest.raises(ValueError, match="width 30 is not divisible by heads 4"):
        decoder(width=30)
    with pytest.raises(ValueError, match="reads token ids"):
        MODELS.build("transformer_encoder", {}, in_shape=(1, 8, 8), num_outputs=10, vocab_size=None)


def test_vocabulary_comes_from_the_training_split_only():
    text = "abab" * 200 + "cdcd" * 10 + "zzzz" * 20  # 'z' is only in the test span
    raw = language_model_windows(text, context_length=8, stride=4)
    splits = make_splits(raw, val_fraction=0.05, test_fraction=0.1, seed=0)
    assert "z" not in splits.vocab and "a" in splits.vocab and splits.vocab[:2] == ["<pad>", "<unk>"]
    assert (splits.x_test == UNK).any() and (splits.y_test == UNK).any()
    assert not (splits.x_train == UNK).any()
    # windows stay in order: the targets are the inputs shifted by one
    np.testing.assert_array_equal(splits.x_train[0, 1:], splits.y_train[0, :-1])
    assert decode(splits.x_train[0], splits.vocab, "") == "abababab"


@pytest.mark.parametrize("stride", [8, 3, 1])
def test_language_model_targets_never_fall_in_two_splits(stride):
    from deepyard.data.splits import _ordered_splits

    words = " ".join(f"w{i}" for i in range(600))  # every target token is unique
    raw = language_model_windows(words, context_length=8, stride=stride, level="word")
    splits = _ordered_splits(raw, val_fraction=0.1, test_fraction=0.1, max_train_samples=None)
    train, val, test = (set(getattr(splits, f"y_{name}").ravel()) for name in ("train", "val", "test"))
    assert train and val and test and not (train & val) and not (val & test) and not (train & test)


def test_labelled_texts_pad_cut_and_drop_rare_words():
    texts = ["good good film", "bad film", "good", "bad bad bad bad bad bad", "rare words here"] * 4
    labels = ["pos", "neg", "pos", "neg", "neg"] * 4
    raw = labelled_texts(texts, labels, level="word", max_length=4, min_count=3, max_vocab=None)
    splits = make_splits(raw, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert splits.x_train.shape[1] == 4 and splits.x_train.dtype == np.int64
    assert set(splits.vocab) <= {"<pad>", "<unk>", "good", "bad", "film"}
    assert splits.class_names == ["neg", "pos"]
    index = {token: i for i, token in enumerate(splits.vocab)}
    assert encode("Good, rare film!", index, "word", length=6) == [
        index["good"], UNK, UNK, index["film"], UNK, PAD]  # lower-cased; ',' '!' and 'rare' unknown


def test_text_data_sets_load_offline():
    lm = load_splits("shakespeare_char", {"context_length": 32, "plays": ["macbeth"]}, val_fraction=0.1,
                     test_fraction=0.1, seed=0)
    assert lm.task == "language_model" and lm.in_shape == (32,) and lm.num_outputs == len(lm.vocab)
    assert "MACBETH:" in "".join(decode(row, lm.vocab, "") for row in lm.x_train[:400])
    reviews = load_splits("rotten_tomatoes", {"max_length": 32}, val_fraction=0.1, test_fraction=0.15, seed=0)
    assert reviews.class_names == ["rotten", "fresh"] and reviews.in_shape == (32,)
    assert 0.5 < reviews.y_train.mean() < 0.65  # 58% fresh, stratified
    with pytest.raises(DataError, match="no play 'macbet'; did you mean 'macbeth'"):
        load_splits("shakespeare_char", {"plays": ["macbet"]}, val_fraction=0.1, test_fraction=0.1, seed=0)


def test_text_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\n" + "\n".join(f'"great fun {i}",good\n"dull and slow {i}",bad' for i in range(20)))
    splits = load_splits("text_csv", {"path": str(path), "text": "review", "label": "stars", "max_length": 8},
                         val_fraction=0.2, test_fraction=0.2, seed=0)
    assert splits.class_names == ["bad", "good"] and "great" in splits.vocab
    with pytest.raises(DataError, match="no column 'text'"):
        load_splits("text_csv", {"path": str(path)}, val_fraction=0.2, test_fraction=0.2, seed=0)


def test_language_model_metrics_and_sampling():
    task = LanguageModel()
    metrics = task.metrics(torch.tensor([2.0 * 100, 30.0, 100.0]), "val")
    assert metrics["val_loss"] == 2.0 and metrics["val_bits_per_token"] == pytest.approx(2 / math.log(2))
    assert metrics["val_perplexity"] == pytest.approx(math.exp(2.0)) and metrics["val_accuracy"] == 0.3
    model = decoder().eval()
    greedy = generate(model, [3, 4], window=10, max_new_tokens=15, temperature=0)
    assert len(greedy) == 15 and min(greedy) >= 2  # never <pad> or <unk>
    assert generate(model, [3, 4], window=10, max_new_tokens=15, temperature=1.0, top_k=1) == greedy
    sampled = [generate(model, [3, 4], window=10, max_new_tokens=15, seed=seed) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_text_payloads():
    vocab = ["<pad>", "<unk>", "good", "film", "bad"]
    metadata = {"task": "classification", "input_shape": [4], "vocab": vocab, "token_level": "word"}
    batch = Classification.codec.decode({"instances": ["Good film", "bad bad bad bad bad"]}, metadata, 8)
    np.testing.assert_array_equal(batch, [[2, 3, 0, 0], [4, 4, 4, 4]])
    for bad in ([[1, 2, 3, 4]], [""]):
        with pytest.raises(BadRequest, match="each instance: a text string"):
            Classification.codec.decode({"instances": bad}, metadata, 8)
    assert Classification.codec.example(np.array([2, 3, 0, 0]), metadata) == "good film"


def test_language_model_payloads():
    chars = ["<pad>", "<unk>"] + list("abc ")
    metadata = {"task": "language_model", "input_shape": [10], "vocab": chars, "token_level": "char"}
    requests = LanguageModel.codec.decode({"instances": ["abc", {"prompt": "ab", "max_new_tokens": 5, "temperature": 0,
                                                      "top_k": 2, "seed": 1}]}, metadata, 4)
    assert requests[0].ids == [2, 3, 4] and requests[0].max_new_tokens == 100
    assert requests[1].temperature == 0.0 and requests[1].top_k == 2
    model = decoder(vocab_size=len(chars)).eval()
    texts = LanguageModel.codec.run(model, requests, metadata)
    assert texts[0]["prompt"] == "abc" and len(texts[1]["text"]) == 5 and set(texts[1]["text"]) <= set("abc ")
    for body, message in [({"instances": [{"prompt": ""}]}, "needs a non-empty prompt"),
                          ({"instances": [{"prompt": "a", "max_new_tokens": 10**6}]}, "max_new_tokens: 1000000"),
                          ({"instances": [{"prompt": "a", "temperature": -1}]}, "temperature: -1"),
                          ({"instances": [{"prompt": "a", "top_p": 0.9}]}, "unknown key 'top_p'"),
                          ({"instances": [{"prompt": "a", "temperature": 1e-300}]}, "must be 0 (greedy) or"),
                          ({"instances": [{"prompt": "a", "seed": 2**64}]}, "seed: 18446744073709551616"),
                          ({"instances": [{"prompt": "a", "max_new_tokens": 2048}] * 3}, "6144 new tokens"),
                          ({"instances": ["a"] * 5}, "over this endpoint's limit of 4")]:
        with pytest.raises(BadRequest, match=re.escape(message)):
            LanguageModel.codec.decode(body, metadata, 4)


SEQUENCE_SPEC = """
kind: train
name: sequences
data: {name: shakespeare_char, params: {context_length: 32, plays: [macbeth]}}
model: {name: %s, params: %s}
"""


@pytest.mark.parametrize(("model", "params", "message"), [
    ("transformer_decoder", "{context_length: 16}", "sequences have 32 tokens but the model's context_length is 16"),
    ("transformer_decoder", "{width: 30}", "width 30 is not divisible by heads 4"),
    ("transformer_encoder", "{}",
     "'transformer_encoder' does not fit data 'shakespeare_char': it is not a language model"),
    ("mlp", "{}", "model 'mlp' reads numbers but data 'shakespeare_char' is text"),
])
def test_bad_sequence_settings_exit_2_before_ray_starts(cli, write_spec, model, params, message):
    result = cli("validate", write_spec(SEQUENCE_SPEC % (model, params)), expect=2)
    assert message in " ".join(result.stderr.split())


def test_a_lookback_longer_than_the_series_exits_2(cli, write_spec):
    spec = write_spec("kind: train\nname: long\ndata: {name: sunspots, params: {lookback: 400}}\nmodel: {name: lstm}\n")
    result = cli("validate", spec, expect=2)
    assert "the series has 309 points; lookback 400 and horizon 1 leave no windows" in " ".join(result.stderr.split())

