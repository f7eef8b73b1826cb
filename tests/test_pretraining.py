"""Masked-language-model pretraining (BERT's): the masked windows, the fill-mask head and task, a
pretrained encoder's vocabulary and weights carried into a fine-tuning job through ``init.from``,
and the fill-mask model served over real HTTP, on the session's real Ray cluster and MLflow."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from deepyard import tracking
from deepyard.data.splits import MASK, MASK_ID, PAD, make_splits
from deepyard.data.text import masked_windows
from deepyard.models.transformer import transformer_encoder
from deepyard.serve.payloads import BadRequest
from deepyard.tasks.masked_lm import FillMask, MaskedLanguageModel
from tests.conftest import last_json

TEXT = " ".join(f"{name} {verb} the {noun} ." for name, verb, noun in
                zip(["ann", "bob", "cy", "dee"] * 300, ["saw", "had", "fed"] * 400,
                    ["cat", "dog", "hen", "cow", "pig"] * 240))


def test_masked_windows_hide_tokens_as_the_seed_says_and_copies_stay_together():
    raw = masked_windows(TEXT, 16, "word", mask_rate=0.15, copies=3, seed=7)
    again = masked_windows(TEXT, 16, "word", mask_rate=0.15, copies=3, seed=7)
    assert np.array_equal(raw.x, again.x) and np.array_equal(raw.y, again.y)
    assert not np.array_equal(raw.x, masked_windows(TEXT, 16, "word", mask_rate=0.15, copies=3, seed=8).x)
    mask = raw.symbols.index(MASK)
    assert np.array_equal(raw.x == mask, raw.y != PAD)  # exactly the hidden tokens are scored
    assert (raw.y != PAD).any(axis=1).all() and 0.1 < (raw.y != PAD).mean() < 0.2
    originals = np.where(raw.y != PAD, raw.y, raw.x)
    assert (originals[0::3] == originals[1::3]).all() and (originals[0::3] == originals[2::3]).all()
    assert not np.array_equal(raw.x[0::3], raw.x[1::3])  # one window, its own mask in each copy
    assert raw.split_gap == 2 and raw.ordered


def test_training_redraws_the_masks_keeping_the_text_and_each_windows_count():
    from deepyard.tasks.masked_lm import MaskedLanguageModel

    splits = make_splits(masked_windows(TEXT, 16, "word", mask_rate=0.15, copies=1, seed=0), val_fraction=0.1,
                         test_fraction=0.1, seed=0)
    inputs, targets = torch.from_numpy(splits.x_train[:64]).clone(), torch.from_numpy(splits.y_train[:64]).clone()
    inputs[-1, -3:], targets[-1, -3:] = PAD, PAD  # a padded window: padding is never hidden
    torch.manual_seed(0)
    fresh_inputs, fresh_targets = MaskedLanguageModel.training_batch(inputs, targets)
    text = torch.where(targets != PAD, targets, inputs)
    assert torch.equal(torch.where(fresh_targets != PAD, fresh_targets, fresh_inputs), text)
    assert torch.equal((fresh_inputs == MASK_ID), (fresh_targets != PAD))
    assert torch.equal((fresh_targets != PAD).sum(dim=1), (targets != PAD).sum(dim=1))
    assert not (fresh_targets[-1, -3:] != PAD).any() and (fresh_inputs[-1, -3:] == PAD).all()
    moved = ((fresh_targets != PAD) != (targets != PAD)).any(dim=1).float().mean()
    assert moved > 0.9  # new places, not the data's
    again_inputs, _ = MaskedLanguageModel.training_batch(inputs, targets)
    assert not torch.equal(again_inputs, fresh_inputs)  # and new ones every step


def test_a_mask_written_in_the_text_is_left_out_not_learnt():
    raw = masked_windows(TEXT.replace("the cat", "the <mask> cat"), 16, "word", mask_rate=0.15, copies=1, seed=0)
    mask = raw.symbols.index(MASK)
    assert np.array_equal(raw.x == mask, raw.y != PAD)  # every <mask> in the inputs is one to fill in
    assert not (raw.y == mask).any()


def test_the_vocabulary_puts_mask_third_and_a_pretrained_one_is_kept_then_extended():
    raw = masked_windows(TEXT, 16, "word", mask_rate=0.15, copies=2, seed=0)
    splits = make_splits(raw, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert splits.vocab[MASK_ID] == MASK and splits.num_outputs == len(splits.vocab)
    assert (splits.x_train == MASK_ID).sum() == (splits.y_train != PAD).sum()
    inherited = ["<pad>", "<unk>", MASK, "the", "cat", "zebra", "."]
    again = make_splits(raw, val_fraction=0.1, test_fraction=0.1, seed=0, vocab=inherited)
    assert again.vocab[:7] == inherited and set(again.vocab[7:]) == set(splits.vocab) - set(inherited)
    decoded = [again.vocab[i] for i in np.where(again.y_train != PAD, again.y_train, again.x_train).ravel()]
    assert decoded == [splits.vocab[i] for i in np.where(splits.y_train != PAD, splits.y_train,
                                                         splits.x_train).ravel()]  # the same words, recoded
    assert np.array_equal(again.x_train == MASK_ID, splits.x_train == MASK_ID)


def test_a_grown_vocabulary_keeps_the_pretrained_rows_of_the_token_embedding():
    from deepyard import transfer

    torch.manual_seed(0)
    source = transformer_encoder((8,), 20, vocab_size=20, width=16, layers=1, heads=2, head="tokens")
    target = transformer_encoder((8,), 2, vocab_size=26, width=16, layers=1, heads=2)
    fresh_rows = target.embeddings.tokens.weight[20:].detach().clone()
    plan, new = transfer.copy_plan(target, source.state_dict(), None)
    transfer.copy_into(target, plan)
    assert torch.equal(target.embeddings.tokens.weight[:20], source.embeddings.tokens.weight)
    assert torch.equal(target.embeddings.tokens.weight[20:], fresh_rows)
    assert new == ["head.weight", "head.bias"]
    assert torch.equal(target.blocks[0].qkv.weight, source.blocks[0].qkv.weight)
    smaller = transformer_encoder((8,), 2, vocab_size=12, width=16, layers=1, heads=2)
    with pytest.raises(Exception, match="embeddings.tokens.weight"):
        transfer.copy_plan(smaller, source.state_dict(), None)  # fewer tokens than the source: not a growth


def test_the_token_head_scores_only_the_masks_and_the_task_lines_them_up():
    torch.manual_seed(0)
    net = transformer_encoder((8,), 30, vocab_size=30, width=16, layers=1, heads=2, dropout=0.0, head="tokens")
    ids = torch.randint(3, 30, (4, 8))
    ids[0, 2] = ids[3, 5] = ids[3, 7] = MASK_ID
    targets = torch.zeros_like(ids)
    targets[0, 2], targets[3, 5], targets[3, 7] = 5, 6, 7
    outputs = net(ids)
    assert outputs.shape == (3, 30) and net.every_position(ids).shape == (4, 8, 30)
    assert torch.allclose(net.every_position(ids)[ids == MASK_ID], outputs, atol=1e-6)
    assert net.head.weight is net.embeddings.tokens.weight  # read with the input embedding
    task = MaskedLanguageModel()
    sums = task.batch_sums(outputs, targets)
    assert sums[-1] == 3
    assert torch.isclose(sums[0] / 3, task.loss(outputs, targets))
    perfect = torch.full((3, 30), -10.0)
    perfect[[0, 1, 2], [5, 6, 7]] = 10.0
    assert task.metrics(task.batch_sums(perfect, targets), "val")["val_accuracy"] == 1.0
    with pytest.raises(ValueError, match="head: tokens"):
        transformer_encoder((8,), 2, vocab_size=30, head="tokens")
    assert "head: tokens" in MaskedLanguageModel.fits(transformer_encoder((8,), 2, vocab_size=30), None)


def test_fill_mask_requests_are_checked_and_answered_per_mask():
    vocab = ["<pad>", "<unk>", MASK, "the", "cat", "sat", "."]
    metadata = {"vocab": vocab, "token_level": "word", "input_shape": [6]}
    codec = FillMask()
    blanks = codec.decode({"instances": ["the <mask> sat <mask>", {"text": "<mask> cat", "top_k": 2}]},
                          metadata, 8)
    assert [b.ids for b in blanks] == [[3, MASK_ID, 5, MASK_ID], [MASK_ID, 4]] and blanks[1].top_k == 2

    def scores(batch):  # "cat" wherever a mask is, "." elsewhere
        out = torch.full((*batch.shape, len(vocab)), -5.0)
        out[..., 6] = -1.0
        out[batch == MASK_ID] = torch.tensor([-9.0, -9.0, 0.0, -3.0, -0.1, -2.0, -4.0])
        return torch.log_softmax(out, -1)

    answers = codec.run(scores, blanks, metadata)
    assert answers[0]["text"] == "the cat sat cat" and len(answers[0]["masks"]) == 2
    assert [m["token"] for m in answers[1]["masks"][0]] == ["cat", "sat"]  # never <mask> itself
    assert codec.example(np.array([3, MASK_ID, 5, 0, 0, 0]), metadata) == "the <mask> sat"
    for body, status, says in [({"instances": ["the cat"]}, 400, "no <mask>"),
                               ({"instances": ["the <mask> " * 4]}, 413, "at most 6"),
                               ({"instances": [{"text": "<mask>", "top_k": 0}]}, 400, "top_k"),
                               ({"instances": [{"text": "<mask>", "beam": 1}]}, 400, "unknown key"),
                               ({"instances": [3]}, 400, "text string")]:
        with pytest.raises(BadRequest, match=says) as raised:
            codec.decode(body, metadata, 8)
        assert raised.value.status == status


MLM_JOB = """
kind: train
name: tiny_mlm
data: {{name: masked_text, params: {{corpus: [{corpus}], context_length: 12, copies: 4, min_count: 1}},
       val_fraction: 0.1, test_fraction: 0.1}}
model: {{name: transformer_encoder, params: {{width: 32, layers: 1, heads: 2, dropout: 0.0, head: tokens}}}}
optim: {{name: adam, lr: 0.01}}
train: {{epochs: 6, batch_size: 32}}
register: {{model_name: tiny-mlm}}
"""

FINE_TUNE_JOB = """
kind: train
name: tiny_sentiment
data: {{name: text_csv, params: {{path: {path}, level: {level}, max_length: 12}}}}
model: {{name: transformer_encoder, params: {{width: 32, layers: 1, heads: 2, dropout: 0.0, context_length: 12}}}}
init: {{from: "tiny-mlm:{version}"}}
train: {{epochs: 2, batch_size: 16}}
register: {{model_name: tiny-sentiment}}
"""


@pytest.mark.slow  # (~60 s: two jobs, then an endpoint)
def test_a_pretrained_encoder_fine_tunes_with_its_vocabulary_and_fills_masks_over_http(
        ray_cluster, cli, write_spec, tmp_path):
    import pandas as pd
    from ray import serve

    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions
    from tests.test_serve import free_port

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    result = cli("run", str(write_spec(MLM_JOB.format(corpus=corpus))), "--json")
    summary = last_json(result)
    # "the" and "." are certain wherever they are hidden, the rest far less: learnt, not guessed
    assert summary["metrics"]["test_accuracy"] > 0.5, summary["metrics"]
    run = tracking.client().get_run(summary["run_id"])
    assert {"val_accuracy", "val_perplexity", "tokens_per_s"} <= set(run.data.metrics)
    pretrained = tracking.model_metadata("tiny-mlm", summary["model_version"])
    assert pretrained["task"] == "masked_language_model" and pretrained["vocab"][MASK_ID] == MASK

    rows = [("ann fed the cat", "yes"), ("bob saw the pig", "no")] * 30 + [("zed ate a kiwi", "yes")] * 4
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp_path / "labelled.csv", index=False)
    tuned = cli("run", write_spec(FINE_TUNE_JOB.format(path=tmp_path / "labelled.csv", level="word",
                                                       version=summary["model_version"]), "tune.yaml"), "--json")
    version = last_json(tuned)["model_version"]
    assert tracking.client().get_model_version("tiny-sentiment", version).tags["init_from"] == \
        f"tiny-mlm:{summary['model_version']}"
    metadata = tracking.model_metadata("tiny-sentiment", version)
    extended = metadata["vocab"][len(pretrained["vocab"]):]  # the encoder's words, then the data's new ones
    assert metadata["vocab"][: len(pretrained["vocab"])] == pretrained["vocab"] and {"zed", "kiwi"} <= set(extended)
    wrong = cli("run", write_spec(FINE_TUNE_JOB.format(path=tmp_path / "labelled.csv", level="char",
                                                       version=summary["model_version"]), "char.yaml"), expect=2)
    assert "reads word tokens" in wrong.stderr

    port = free_port()
    infos = deploy.start([EndpointOptions(model=f"tiny-mlm:{summary['model_version']}", num_cpus=0.5)],
                         host="127.0.0.1", port=port)
    try:
        url = infos[0]["url"] + "/predict"
        asked = "ann fed <mask> cat <mask> bob saw the pig ."  # (each blank certain from the words around it)
        answer = httpx.post(url, json={"instances": [asked, {"text": "<mask>", "top_k": 3}]}, timeout=60)
        assert answer.status_code == 200, answer.text
        first, second = answer.json()["predictions"]
        assert [masks[0]["token"] for masks in first["masks"]] == ["the", "."], (first, summary["metrics"])
        assert first["text"] == "ann fed the cat . bob saw the pig ."
        assert len(second["masks"][0]) == 3
        for body, status in [({"instances": ["no blanks"]}, 400), ({"instances": ["<mask> " * 40]}, 413)]:
            refused = httpx.post(url, json=body, timeout=30)
            assert refused.status_code == status, refused.text
        assert httpx.post(url, json={"instances": ["<mask> saw the dog"]}, timeout=30).status_code == 200
    finally:
        serve.shutdown()  # (the next test's endpoint starts Serve on a port of its own)


def test_span_corruption_hides_spans_behind_sentinels_that_the_target_fills_in():
    from deepyard.data.seq2seq import SENTINEL, span_corrupted, span_corruption

    words = TEXT.split()[:64]
    source, target = span_corrupted(words, 0.15, 3.0, np.random.default_rng(0))
    spans = [token for token in source if token.startswith("<extra_id_")]
    assert spans == [SENTINEL.format(k) for k in range(len(spans))] and len(spans) == 3  # 10 hidden / 3
    assert target[-1] == SENTINEL.format(len(spans)) and len(target) - len(spans) - 1 == 10
    filled, hidden = [], {}
    for token in target[:-1]:  # the target: each sentinel, then what it hid
        hidden.setdefault(token, []) if token in spans else hidden[list(hidden)[-1]].append(token)
    for token in source:
        filled += hidden[token] if token in spans else [token]
    assert filled == words  # source and target together give the window back
    again = span_corrupted(words, 0.15, 3.0, np.random.default_rng(0))
    assert again == (source, target) and span_corrupted(words, 0.15, 3.0, np.random.default_rng(1)) != again
    raw = span_corruption(corpus=["film_plots"], context_length=32, split_seed=3)
    assert raw.task == "seq2seq" and raw.x.shape[1] == 2 and SENTINEL.format(0) in raw.symbols
    assert np.array_equal(raw.x, span_corruption(corpus=["film_plots"], context_length=32, split_seed=3).x)


def test_the_reviews_as_text_to_text_pairs():
    from deepyard.data.seq2seq import rotten_tomatoes_pairs

    raw = rotten_tomatoes_pairs(max_length=8)
    assert len(raw.x) == 12808 and raw.x.shape[1:] == (2, 10)  # "sentiment :" and 8 words
    first = [raw.symbols[i] for i in raw.x[0, 0] if i]
    assert first[:2] == ["sentiment", ":"]
    labels = {raw.symbols[row[0]] for row in raw.y}
    assert labels == {"fresh", "rotten"} and all(raw.symbols[row[1]] == "</s>" for row in raw.y[:50])


def test_special_tokens_are_one_word_each():
    from deepyard.data.text import tokens

    assert tokens("To be or <mask> to be, <extra_id_0> <extra_id_12>!", "word") == [
        "to", "be", "or", "<mask>", "to", "be", ",", "<extra_id_0>", "<extra_id_12>", "!"]
    assert tokens("a <b> c", "word") == ["a", "<", "b", ">", "c"]  # any other markup as before


@pytest.mark.slow
@pytest.mark.long  # ~40 s: two workers, one restart
def test_pretraining_runs_data_parallel_and_goes_on_from_its_checkpoint_when_a_worker_dies(
        ray_cluster, cli, write_spec, tmp_path):
    """Pretraining is a job like any other: DDP over two workers, and rank 0 killed after epoch 2's
    checkpoint once; the new worker group goes on from that checkpoint, in the same MLflow run."""
    import faults

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    faults.crash_after_epoch("ddp_mlm", 2)
    spec = write_spec(MLM_JOB.format(corpus=corpus).replace("name: tiny_mlm", "name: ddp_mlm"), "ddp_mlm.yaml")
    summary = last_json(cli("run", spec, "--json", "--set", "train.epochs=4", "--set", "scaling.num_workers=2",
                            "--set", "scaling.cpus_per_worker=1", "--set", "failure.max_failures=1",
                            "--set", "register.enabled=false"))
    client = tracking.client()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    assert [m.value for m in client.get_metric_history(summary["run_id"], "resumed_from_epoch")] == [2]
    losses = {m.step: m.value for m in client.get_metric_history(summary["run_id"], "train_loss")}
    assert sorted(losses) == [1, 2, 3, 4], "an epoch was lost or trained twice"
    assert losses[4] < losses[1] and {"test_accuracy", "test_perplexity"} <= set(summary["metrics"])
