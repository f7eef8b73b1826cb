"""Sequence to sequence: the generated data sets (SCAN, dates), beam search, and a T5-like model
trained through the CLI on the session's real Ray cluster, tracked in real MLflow and served by
real Ray Serve over HTTP."""

from __future__ import annotations

import datetime

import httpx
import numpy as np
import pytest
import torch

from deepyard import tracking
from deepyard.data.seq2seq import date_held_out, dates, scan, scan_commands
from deepyard.tasks.seq2seq import beam_search
from tests.conftest import last_json


def test_scan_is_generated_from_its_grammar():
    commands = scan_commands()
    assert len(commands) == 20910  # as the published data set
    assert commands["jump"] == ["I_JUMP"]
    assert commands["walk left"] == ["I_TURN_LEFT", "I_WALK"]
    assert commands["turn opposite right"] == ["I_TURN_RIGHT", "I_TURN_RIGHT"]
    assert commands["look around left twice"] == ["I_TURN_LEFT", "I_LOOK"] * 8
    assert commands["jump after run thrice"] == ["I_RUN"] * 3 + ["I_JUMP"]
    assert commands["walk and turn left"] == ["I_WALK", "I_TURN_LEFT"]


def test_scan_splits_are_those_of_the_paper_and_follow_the_seed():
    add_jump = scan("add_jump")
    assert (len(add_jump.x), len(add_jump.x_test)) == (13204, 7706)
    jump = add_jump.symbols.index("jump")
    trained_with_jump = [row for row in add_jump.x[:, 0] if jump in row]
    assert len(trained_with_jump) == 1 and np.count_nonzero(trained_with_jump[0]) == 1  # "jump" alone
    assert all(jump in row for row in add_jump.x_test[:, 0])
    simple = scan("simple", split_seed=0)
    assert len(simple.x_test) == 20910 // 5
    assert np.array_equal(simple.x_test, scan("simple", split_seed=0).x_test)
    assert not np.array_equal(simple.x_test, scan("simple", split_seed=1).x_test)


def test_dates_follow_the_seed_and_no_test_day_is_trained_on():
    raw = dates(samples=3000, test_fraction=0.2, split_seed=3)
    again = dates(samples=3000, test_fraction=0.2, split_seed=3)
    assert np.array_equal(raw.x, again.x) and np.array_equal(raw.y_test, again.y_test)
    assert not np.array_equal(raw.x, dates(samples=3000, test_fraction=0.2, split_seed=4).x)

    def days(y):
        return {"".join(raw.symbols[i] for i in row if i > 3) for row in y}  # (0-3: pad, unk, <s>, </s>)

    train, test = days(raw.y), days(raw.y_test)
    assert not train & test and len(test) > 300
    assert all(date_held_out(datetime.date.fromisoformat(day), 3, 0.2) for day in test)
    sources = {"".join(raw.symbols[i] for i in row if i > 3) for row in raw.x[:, 0]}
    assert any("." in source for source in sources) and any(" de " in source for source in sources)


def test_beam_search_of_width_one_is_greedy_and_wider_beams_score_no_worse():
    torch.manual_seed(0)
    table = torch.log_softmax(torch.randn(9, 9), dim=-1)  # next token's log-probabilities, by the last token

    def log_probs(pairs):  # (a toy model: a Markov chain over the decoder's input)
        return table[pairs[:, 1]]

    specials = (2, 3)

    def greedy(source):
        ids = []
        for step in range(6):
            scores = log_probs(torch.tensor([[source + [0] * (7 - len(source)), [2] + ids + [0] * (6 - len(ids))]]))
            scores = scores[0, step].clone()
            scores[[0, 1, 2]] = -float("inf")
            if step == 5:
                break
            token = int(scores.argmax())
            if token == 3:
                break
            ids.append(token)
        return ids

    def score(ids):
        sequence = [2] + ids + [3]
        return sum(float(table[a, b]) for a, b in zip(sequence, sequence[1:]))

    assert beam_search(log_probs, [4, 5], specials, length=7, max_length=5, beam_width=1) == greedy([4, 5])
    wide = beam_search(log_probs, [4, 5], specials, length=7, max_length=5, beam_width=4)
    assert score(wide) >= score(greedy([4, 5])) - 1e-6


def test_the_model_reads_pairs_answers_each_decoder_step_and_learns_a_tiny_batch():
    from deepyard.models import MODELS
    from deepyard.tasks.seq2seq import Seq2Seq

    torch.manual_seed(0)
    model = MODELS.build("transformer_seq2seq", {"width": 32, "layers": 1, "heads": 2, "dropout": 0.0},
                         in_shape=(2, 6), num_outputs=9, vocab_size=9)
    pairs = torch.zeros(16, 2, 6, dtype=torch.long)
    pairs[:, 0, :3] = torch.randint(4, 9, (16, 3))
    pairs[:, 1, 0], pairs[:, 1, 1:4] = 2, pairs[:, 0, :3]  # <s> then a copy of the source
    targets = torch.zeros(16, 6, dtype=torch.long)
    targets[:, :3], targets[:, 3] = pairs[:, 0, :3], 3
    assert model.eval()(pairs).shape == (16, 4, 9)  # cut to the longest target
    exported = torch.export.export(model, (pairs,)).module()
    assert exported(pairs).shape == (16, 6, 9)  # (the served program: every position, a fixed shape)
    assert torch.allclose(exported(pairs)[:, :4], model(pairs), atol=1e-5)
    model.train()
    assert model(pairs).shape == (16, 4, 9)
    task, optimizer = Seq2Seq(), torch.optim.Adam(model.parameters(), lr=1e-2)
    first = task.loss(model(pairs), targets).item()
    for _ in range(100):
        loss = task.loss(model(pairs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    with pytest.raises(ValueError, match="source and target pairs"):
        MODELS.build("transformer_seq2seq", {}, in_shape=(12,), num_outputs=9, vocab_size=9)


def test_more_position_buckets_tell_apart_offsets_a_long_output_is_counted_by():
    """T5's 32 buckets give the decoder 16 exact offsets back, then groups: SCAN's outputs (up to 48
    actions) are counted out past that. ``position_buckets`` widens the exact part; a bad count is refused."""
    from deepyard.models import MODELS
    from deepyard.models.seq2seq import RelativePositionBias

    back = -torch.arange(64)
    assert len(RelativePositionBias(4, bidirectional=False).bucket(back).unique()) < 32  # 16 exact, then grouped
    model = MODELS.build("transformer_seq2seq", {"width": 32, "layers": 1, "heads": 2, "position_buckets": 128},
                         in_shape=(2, 50), num_outputs=9, vocab_size=9)
    assert len(model.decoder_bias.bucket(back).unique()) == 64  # every offset of a 49-token output its own
    both_ways = torch.arange(-31, 32)
    assert len(model.encoder_bias.bucket(both_ways).unique()) == 63
    pairs = torch.randint(1, 9, (2, 2, 50))
    assert model.eval()(pairs).shape == (2, 50, 9)
    for bad in (3, 2):
        with pytest.raises(ValueError, match="position_buckets"):
            MODELS.build("transformer_seq2seq", {"position_buckets": bad}, in_shape=(2, 6), num_outputs=9,
                         vocab_size=9)


PAIRS_JOB = """
kind: train
name: tiny_seq2seq
data:
  name: text_pairs_csv
  params: {{path: {path}, level: char}}
  val_fraction: 0.1
  test_fraction: 0.1
model: {{name: transformer_seq2seq, params: {{width: 64, layers: 2, heads: 4, dropout: 0.0}}}}
optim: {{name: adam, lr: 0.003, schedule: {{name: cosine, warmup_epochs: 1}}}}
train: {{epochs: {epochs}, batch_size: 32}}
register: {{model_name: tiny-seq2seq}}
"""


@pytest.mark.slow
@pytest.mark.long  # (~100 s: 40 epochs, then an endpoint)
def test_a_seq2seq_model_learns_to_copy_and_answers_over_http(ray_cluster, cli, write_spec, tmp_path):
    import pandas as pd
    from ray import serve

    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions
    from tests.test_serve import free_port

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcd"), size=rng.integers(1, 4))) for _ in range(1200)]
    pd.DataFrame({"source": words, "target": words}).to_csv(tmp_path / "copy.csv", index=False)
    result = cli("run", str(write_spec(PAIRS_JOB.format(path=tmp_path / "copy.csv", epochs=40))), "--json")
    assert result.exit_code == 0, result.stderr
    summary = last_json(result)
    assert summary["metrics"]["test_exact_match"] >= 0.9
    assert summary["metrics"]["test_token_accuracy"] >= summary["metrics"]["test_exact_match"]
    run = tracking.client().get_run(summary["run_id"])
    assert {"val_exact_match", "val_token_accuracy", "tokens_per_s"} <= set(run.data.metrics)
    samples = {a.path for a in tracking.client().list_artifacts(summary["run_id"], "samples")}
    assert "samples/epoch_0040.txt" in samples

    port = free_port()
    infos = deploy.start([EndpointOptions(model=f"tiny-seq2seq:{summary['model_version']}", num_cpus=0.5)],
                         host="127.0.0.1", port=port)
    try:
        url = infos[0]["url"] + "/predict"
        answer = httpx.post(url, json={"instances": ["cab", {"text": "dcb", "beam_width": 3}]}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert [p["text"] for p in answer.json()["predictions"]] == ["cab", "dcb"]
        for body, status, says in [
            ({"instances": [{"text": "ab", "beam_width": 99}]}, 400, "beam_width"),
            ({"instances": [{"text": "ab", "max_length": 0}]}, 400, "max_length"),
            ({"instances": ["a" * 500]}, 413, "tokens"),
            ({"instances": [""]}, 400, "non-empty"),
            ({"instances": ["ab"] * 10_000}, 413, "limit"),
        ]:
            wrong = httpx.post(url, json=body, timeout=30)
            assert wrong.status_code == status and says in wrong.json()["error"], wrong.text
        assert httpx.post(url, json={"instances": ["ab"]}, timeout=30).status_code == 200  # still answering
    finally:
        serve.shutdown()  # (the next test's endpoint starts Serve on a port of its own)
