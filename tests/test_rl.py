"""`kind: rl`: spec checks before Ray starts, the greedy policy module, and tiny runs of every
algorithm on the session's real Ray cluster with real RLlib and MLflow."""

from __future__ import annotations

import json

import gymnasium
import numpy as np
import pytest
import torch
from torch import nn

from deepyard import tracking
from deepyard.rl.policy import GreedyPolicy
from deepyard.runners.rl import evaluated, iteration_line, iteration_metrics, stop_reason
from deepyard.spec import parse_spec
from deepyard.spec.rl import RLEvaluationSpec
from tests.conftest import last_json

SPEC = """
kind: rl
name: tiny_{algorithm}
algorithm: {algorithm}
env: {{id: {env}}}
env_runners: {{count: {runners}}}
training: {training}
stop: {{iterations: 2}}
evaluation: {{interval: 1, episodes: 2}}
register: {{model_name: tiny-{algorithm}}}
"""


# PPO's defaults (4,000 steps an iteration, 30 epochs over them) take a minute an iteration here.
SMALL_PPO = "{train_batch_size_per_learner: 500, minibatch_size: 64, num_epochs: 2}"


def spec_text(algorithm="ppo", env="CartPole-v1", training="{}", runners=1) -> str:
    return SPEC.format(algorithm=algorithm, env=env, training=training, runners=runners)


@pytest.mark.parametrize(("algorithm", "env", "training", "message"), [
    ("ppo", "CartPole-v2", "{}", "unknown gymnasium environment 'CartPole-v2'; did you mean 'CartPole-v1'?"),
    ("ppo", "CartPole-v1", "{lrr: 0.1}", "training.lrr: ppo does not take 'lrr'; did you mean 'lr'?"),
    ("ppo", "CartPole-v1", "{lambda: 0.9}", "training.lambda: ppo does not take 'lambda'; did you mean 'lambda_'?"),
    ("dqn", "Pendulum-v1", "{}", "dqn needs discrete actions; Pendulum-v1 has Box"),
    ("sac", "CartPole-v1", "{}", "sac needs continuous actions; CartPole-v1 has Discrete(2)"),
])
def test_bad_rl_specs_exit_2_before_ray_starts(cli, write_spec, algorithm, env, training, message):
    result = cli("validate", write_spec(spec_text(algorithm, env, training)), expect=2)
    assert message in " ".join(result.stderr.split())


def test_unknown_env_kwargs_and_algorithms_are_named(cli, write_spec):
    spec = write_spec(spec_text().replace("{id: CartPole-v1}", "{id: CartPole-v1, kwargs: {gravity: 3}}"))
    assert "env.kwargs: CartPole-v1 does not take them" in cli("validate", spec, expect=2).stderr
    with pytest.raises(Exception, match="algorithm"):
        parse_spec({"kind": "rl", "name": "x", "algorithm": "a3c", "env": {"id": "CartPole-v1"}})


class Outputs(nn.Module):
    """An RLModule stand-in: fixed action-distribution inputs."""

    def __init__(self, inputs: torch.Tensor):
        super().__init__()
        self.inputs = inputs

    def forward_inference(self, batch: dict) -> dict:
        return {"action_dist_inputs": self.inputs.expand(len(batch["obs"]), -1)}


def test_greedy_policy_maps_distribution_inputs_to_actions_in_the_env_units():
    discrete = GreedyPolicy(Outputs(torch.tensor([[0.1, 2.0, -1.0]])), gymnasium.spaces.Discrete(3), squashed=False)
    assert discrete(torch.zeros(4, 2)).tolist() == [1, 1, 1, 1]
    box = gymnasium.spaces.Box(-2.0, 2.0, (1,))
    # mean 10 (log std ignored): squashed by tanh (SAC) to just under the bound, clipped otherwise (PPO)
    squashed = GreedyPolicy(Outputs(torch.tensor([[10.0, 0.0]])), box, squashed=True)(torch.zeros(2, 3))
    clipped = GreedyPolicy(Outputs(torch.tensor([[10.0, 0.0]])), box, squashed=False)(torch.zeros(2, 3))
    assert squashed.shape == (2, 1) and 1.99 < squashed[0, 0] <= 2.0 and clipped[0, 0] == 2.0
    middle = GreedyPolicy(Outputs(torch.tensor([[0.0, 0.0]])), box, squashed=True)(torch.zeros(1, 3))
    assert middle[0, 0] == 0.0


class LeanWithThePole(nn.Module):
    """Push the cart the way the pole leans (CartPole's observation 2: its angle)."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs[:, 2] > 0).long()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_episodes_played_side_by_side_return_what_each_alone_does(env_id):
    from deepyard.rl.algorithms import env_maker
    from deepyard.rl.policy import play

    policy = LeanWithThePole() if env_id == "CartPole-v1" else nn.Linear(3, 1)  # (Pendulum: a continuous action)
    make = env_maker(env_id, {})
    frames: list = []
    together = play(policy, make, [3, 0, 1, 2, 4], frames=frames, frame_every=2, at_once=3)  # (3, then 2)
    alone = [play(policy, make, [seed])[0] for seed in (3, 0, 1, 2, 4)]
    # (a batch's matmul may round its last bit unlike a single row's: continuous returns are close)
    assert together == pytest.approx(alone, rel=1e-6) and len(set(alone)) > 1  # (different seeds, episodes)
    steps = alone[0] if env_id == "CartPole-v1" else 200  # (CartPole pays 1 a step; Pendulum always runs 200)
    assert len(frames) == -(-steps // 2) and frames[0].ndim == 3  # every other frame, of the first episode only


def test_iteration_metrics_and_stop_conditions():
    result = {"env_runners": {"episode_return_mean": 30.0, "episode_return_min": 9.0, "episode_return_max": 80.0,
                              "episode_len_mean": 30.0, "num_env_steps_sampled": 2000},
              "num_env_steps_sampled_lifetime": 3000, "time_this_iter_s": 2.0,
              "evaluation": {"env_runners": {"episode_return_mean": 480.0, "episode_len_mean": float("nan")}},
              "learners": {"default_policy": {"policy_loss": 0.1, "vf_loss": 2.0, "entropy": 0.6, "weights_seq_no": 3},
                           "__all_modules__": {"total_loss": 9.9}}}
    metrics = iteration_metrics(result)
    assert metrics["env_steps"] == 2000 and metrics["env_steps_per_s"] == 1000
    assert metrics["learner/policy_loss"] == 0.1 and "learner/weights_seq_no" not in metrics
    assert "eval_episode_len_mean" not in metrics  # NaN: RLlib had nothing to report
    spec = parse_spec({"kind": "rl", "name": "x", "algorithm": "ppo", "env": {"id": "CartPole-v1"},
                       "stop": {"mean_return": 475, "timesteps": 10000}})
    assert stop_reason(spec, metrics, 3, 10.0) == "mean return 480.0 >= 475.0"  # the evaluation's return
    assert stop_reason(spec, {**metrics, "eval_return_mean": 100.0}, 3, 10.0) is None
    assert stop_reason(spec, {**metrics, "eval_return_mean": 100.0, "timesteps": 10000}, 3, 10.0) == "10000 timesteps"
    # between evaluations RLlib repeats the last one's numbers: they are dropped, and the exploring
    # return never stands in for the greedy one
    without_count = {**result, "env_runners": {k: v for k, v in result["env_runners"].items()
                                               if k != "num_env_steps_sampled"}}
    assert iteration_metrics(without_count, previous_timesteps=1000)["env_steps"] == 2000  # (DQN reports none)
    between = iteration_metrics(result, evaluated=False)
    assert "eval_return_mean" not in between and between["return_mean"] == 30.0
    assert stop_reason(spec, {**between, "return_mean": 490.0}, 3, 10.0) is None
    assert [evaluated(spec.model_copy(update={"evaluation": RLEvaluationSpec(interval=4)}), i) for i in range(1, 9)] \
        == [False, False, False, True, False, False, False, True]
    assert iteration_line(5, between, 7.2) == "iter 5 steps 3000 return 30.0 [9, 80] 1000 steps/s 7s"
    # an iteration in which no episode ended (a pole balanced all along): RLlib's NaN return is not shown
    balanced = {**result, "env_runners": {**result["env_runners"], "episode_return_mean": float("nan")}}
    assert "nan" not in (line := iteration_line(6, iteration_metrics(balanced, evaluated=False), 8.0))
    assert "no episode ended" in line


# DQN and SAC train on a minibatch per step sampled by default (training_intensity: one sampled
# step per trained one is a thirtieth of that); only PPO samples in an env runner of its own.
TINY = {"ppo": ("CartPole-v1", SMALL_PPO),
        "dqn": ("CartPole-v1", "{num_steps_sampled_before_learning_starts: 100, n_step: [2, 3], "
                               "training_intensity: 1}"),
        "sac": ("Pendulum-v1", "{num_steps_sampled_before_learning_starts: 100, training_intensity: 1}"),
        "appo": ("Acrobot-v1", "{train_batch_size_per_learner: 500}")}


class Agents:
    """Each algorithm's tiny job, run when a test first asks for it: ``agents[name]`` is its summary
    and environment (make test asks for PPO's and SAC's only; DQN's and APPO's are long tests)."""

    def __init__(self, folder):
        self.folder, self.done = folder, {}

    def __getitem__(self, algorithm: str):
        if algorithm not in self.done:
            from typer.testing import CliRunner

            from deepyard.cli import app

            env, training = TINY[algorithm]
            spec = self.folder / f"{algorithm}.yaml"
            spec.write_text(spec_text(algorithm, env, training, runners=1 if algorithm == "ppo" else 0))
            threads = torch.get_num_threads()
            result = CliRunner().invoke(app, ["run", str(spec), "--json"])
            assert result.exit_code == 0, f"{algorithm}: {result.stderr}\n{result.exception!r}"
            assert torch.get_num_threads() == threads  # the learner's one thread was for the job only
            self.done[algorithm] = (last_json(result), env)
        return self.done[algorithm]


@pytest.fixture(scope="module")
def agents(ray_cluster, tmp_path_factory) -> Agents:
    return Agents(tmp_path_factory.mktemp("rl"))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "sac", pytest.param("dqn", marks=pytest.mark.long),
                                       pytest.param("appo", marks=pytest.mark.long)])
def test_tiny_runs_are_tracked_and_register_a_policy_that_acts(agents, algorithm):
    summary, env_id = agents[algorithm]
    assert summary["iterations"] == 2 and summary["stop_reason"] == "2 iterations"
    run = tracking.client().get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    history = tracking.metric_history(summary["run_id"], "timesteps")
    assert [step for step, _ in history] == [1, 2] and history[1][1] > history[0][1] > 0
    artifacts = {a.path for a in tracking.client().list_artifacts(summary["run_id"])}
    assert {"policy.gif", "checkpoint"} <= artifacts
    policy, metadata = tracking.load_model(f"tiny-{algorithm}", summary["model_version"])
    assert metadata["task"] == "rl_policy" and metadata["env_id"] == env_id
    env = gymnasium.make(env_id)
    observations = np.stack([env.observation_space.sample() for _ in range(8)]).astype(np.float32)
    with torch.inference_mode():
        actions = policy(torch.from_numpy(observations)).numpy()
    assert len(actions) == 8 and all(env.action_space.contains(a.astype(env.action_space.dtype)) for a in actions)


@pytest.mark.slow
def test_rl_eval_plays_the_registered_policy(agents, cli, tmp_path):
    agents["ppo"]  # (registered as tiny-ppo)
    gif = tmp_path / "ppo.gif"
    result = cli("rl", "eval", "tiny-ppo", "--episodes", "3", "--render", str(gif), "--json")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["episodes"] == 3 and len(answer["returns"]) == 3 and answer["mean_return"] > 0
    assert gif.read_bytes().startswith(b"GIF8")
    assert "mean return" in result.stderr
    missing = cli("rl", "eval", "tiny-pp", expect=2)
    assert "did you mean 'tiny-ppo'" in missing.stderr


@pytest.mark.slow
@pytest.mark.long  # ~25 s: an endpoint of two policies (make test covers serving in test_serve)
def test_registered_policies_served_over_http(agents):
    import httpx
    from ray import serve

    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions
    from tests.conftest import free_port

    infos = deploy.start([EndpointOptions(model=f"tiny-ppo:{agents['ppo'][0]['model_version']}", num_cpus=0.5),
                          EndpointOptions(model=f"tiny-sac:{agents['sac'][0]['model_version']}", num_cpus=0.5)],
                         host="127.0.0.1", port=free_port())
    try:
        ppo, sac = (info["url"] + "/predict" for info in infos)
        cartpole, pendulum = gymnasium.make("CartPole-v1"), gymnasium.make("Pendulum-v1")
        observations = [cartpole.observation_space.sample().tolist() for _ in range(4)]
        answer = httpx.post(ppo, json={"instances": observations}, timeout=30)
        assert answer.status_code == 200, answer.text
        actions = answer.json()["predictions"]
        assert len(actions) == 4 and all(isinstance(a, int) and cartpole.action_space.contains(a) for a in actions)
        policy, _ = tracking.load_model("tiny-ppo", agents["ppo"][0]["model_version"])
        with torch.inference_mode():  # the endpoint answers what the registered policy does
            assert actions == policy(torch.tensor(observations)).tolist()

        answer = httpx.post(sac, json={"instances": [pendulum.observation_space.sample().tolist()]}, timeout=30)
        assert answer.status_code == 200, answer.text
        (torque,) = answer.json()["predictions"]
        assert len(torque) == 1 and pendulum.action_space.contains(np.array(torque, dtype=np.float32))

        wrong = httpx.post(ppo, json={"instances": [[0.1, 0.2]]}, timeout=30)
        assert wrong.status_code == 400
        assert "one observation of CartPole-v1, 4 numbers" in wrong.json()["error"], wrong.text
    finally:
        serve.shutdown()


SWEEP = """
kind: sweep
name: {name}
base:
  kind: rl
  name: tiny_sweep_ppo
  algorithm: ppo
  env: {{id: CartPole-v1}}
  env_runners: {{count: 0}}
  training: {{train_batch_size_per_learner: 256, minibatch_size: 64, num_epochs: 2}}
  stop: {{iterations: {iterations}}}
  evaluation: {{interval: 1, episodes: 2}}
space: {space}
scheduler: {scheduler}
num_samples: 2
register: {{model_name: {name}}}
promote: {{alias: champion}}
"""


def sweep_text(name="tiny_rl_sweep", space="{training.lr: {loguniform: [0.0003, 0.003]}}",
               scheduler="{name: fifo}", iterations=3) -> str:
    return SWEEP.format(name=name, space=space, scheduler=scheduler, iterations=iterations)


def test_a_sweep_takes_an_rl_base_from_a_file_or_inline(tmp_path):
    from deepyard.spec import RLJob, load_spec

    sweep = load_spec("jobs/cartpole_ppo_sweep.yaml")
    assert isinstance(sweep.base, RLJob) and sweep.base.name == "cartpole_ppo"
    inline = parse_spec(__import__("yaml").safe_load(sweep_text()))
    assert isinstance(inline.base, RLJob) and inline.varied_paths == ["training.lr"]


@pytest.mark.parametrize(("space", "scheduler", "message"), [
    ("{training.lrr: {uniform: [0.1, 0.2]}}", "{name: fifo}",
     "space.training.lrr=0.1: training.lrr: ppo does not take"),
    ("{training.lr: {uniform: [0.1, 0.2]}}", "{name: pbt, mutations: {model.hidden_sizes: {choice: [[8], [16]]}}}",
     "scheduler.mutations.model.hidden_sizes: PBT copies a trial's state"),
    ("{env.id: {choice: [CartPole-v1, CartPole-v9]}}", "{name: fifo}", "unknown gymnasium environment 'CartPole-v9'"),
])
def test_bad_rl_sweeps_exit_2_before_ray_starts(cli, write_spec, space, scheduler, message):
    result = cli("validate", write_spec(sweep_text(space=space, scheduler=scheduler)), expect=2)
    assert message in result.stderr, result.stderr


def test_a_sweep_refuses_a_deploy_base_and_a_min_mode_for_returns(cli, write_spec):
    text = sweep_text().replace("  kind: rl\n", "  kind: deploy\n")
    stderr = cli("validate", write_spec(text), expect=2).stderr
    assert "a sweep varies a job of kind rl or train, not a 'deploy' job" in stderr
    assert "maximizes the return" in cli("validate", write_spec(sweep_text() + "mode: min\n"), expect=2).stderr


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["{name: fifo}", "{name: pbt, perturbation_interval: 1, "
                                                       "mutations: {training.lr: {loguniform: [0.0003, 0.003]}}}"])
def test_rl_sweep_trains_trials_and_registers_the_best_policy(ray_cluster, cli, write_spec, scheduler):
    name = "tiny-rl-pbt" if "pbt" in scheduler else "tiny-rl-sweep"
    summary = last_json(cli("run", write_spec(sweep_text(name=name, scheduler=scheduler)), "--json"))
    assert summary["trials"] == 2 and summary["trials_finished"] == 2
    children = tracking.child_runs(summary["run_id"])
    assert len(children) == 2 and {run.info.status for run in children} == {"FINISHED"}
    for child in children:
        # (under PBT a trial that copies another's state takes its iteration count too: 1, 2, 4 is right)
        steps = sorted({step for step, _ in tracking.metric_history(child.info.run_id, "iteration")})
        assert steps[0] == 1 and steps[-1] >= 3 and (steps == [1, 2, 3] or "pbt" in scheduler)
    best = tracking.client().get_run(summary["best_trial_run_id"])
    assert best.data.metrics["best_eval_return_mean"] == summary["eval_return_mean"]
    assert "policy.gif" in {a.path for a in tracking.client().list_artifacts(best.info.run_id)}
    policy, metadata = tracking.load_model(name, summary["model_version"])
    assert metadata["task"] == "rl_policy" and summary["promotion"]["moved"]
    assert 0 < summary["metrics"]["test_return_mean"] <= 500
    with torch.inference_mode():
        assert set(policy(torch.zeros(3, 4)).tolist()) <= {0, 1}


@pytest.mark.slow
def test_a_trial_goes_on_from_a_checkpoint_as_pbt_and_resume_need(ray_cluster, tmp_path):
    """What a trial does with Tune's checkpoint: the algorithm's whole state, iteration count included."""
    from deepyard.rl import algorithms
    from deepyard.rl.policy import from_algorithm, from_checkpoint

    spec = parse_spec(__import__("yaml").safe_load(sweep_text())).base
    first = algorithms.build_config(spec).build_algo()
    try:
        first.train(), first.train()
        first.save_to_path(str(tmp_path))
        observations = torch.randn(16, 4)
        expected = from_algorithm(first, gymnasium.spaces.Discrete(2), "ppo")(observations)
    finally:
        first.stop()
    second = algorithms.build_config(spec).build_algo()
    try:
        second.restore_from_path(str(tmp_path))
        assert second.iteration == 2
        with torch.inference_mode():
            assert torch.equal(from_algorithm(second, gymnasium.spaces.Discrete(2), "ppo")(observations), expected)
            # and the policy alone, without Ray, as the sweep registers the best trial's
            assert torch.equal(from_checkpoint(str(tmp_path), gymnasium.spaces.Discrete(2), "ppo")(observations),
                               expected)
        assert second.train()["training_iteration"] == 3
    finally:
        second.stop()


@pytest.mark.slow
def test_an_interrupted_rl_job_resumes_from_its_checkpoint(ray_cluster, cli, write_spec, monkeypatch):
    from deepyard.runners import rl

    path = write_spec(spec_text(training=SMALL_PPO).replace("tiny_ppo", "resumable_ppo")
                      .replace("{iterations: 2}", "{iterations: 4}") + "checkpoint: {every_n_iterations: 1}\n")
    assert "no earlier run of 'resumable_ppo'" in cli("run", path, "--resume", expect=2).stderr

    real_stop_reason, real_save = rl.stop_reason, rl.save

    def ctrl_c_after_two(spec, metrics, iteration, elapsed):
        if iteration == 2:
            # Stopped before iteration 2 was saved (a SIGKILL saves nothing; Ctrl-C would save it):
            # --resume goes on from iteration 1 and trains 2 again.
            monkeypatch.setattr(rl, "save", lambda *args: None)
            raise KeyboardInterrupt
        return real_stop_reason(spec, metrics, iteration, elapsed)

    monkeypatch.setattr(rl, "stop_reason", ctrl_c_after_two)
    cli("run", path, expect=130)
    monkeypatch.setattr(rl, "stop_reason", real_stop_reason)
    monkeypatch.setattr(rl, "save", real_save)
    spec = parse_spec(__import__("yaml").safe_load(open(path).read()))
    run_id = tracking.latest_run(spec.experiment, spec.name, {"deepyard.task": "rl_policy"}).info.run_id
    assert tracking.client().get_run(run_id).info.status == "KILLED"
    steps_before = tracking.metric_history(run_id, "timesteps")

    result = cli("run", path, "--resume", "--json")
    summary = last_json(result)
    assert "resuming run" in result.stderr and "after iteration 1" in result.stderr
    assert summary["run_id"] == run_id and summary["iterations"] == 4
    assert tracking.client().get_run(run_id).info.status == "FINISHED"
    history = tracking.metric_history(run_id, "timesteps")
    # each iteration logged once; iteration 2's first values stand
    assert [step for step, _ in history] == [1, 2, 3, 4] and history[:2] == steps_before
    assert history[2][1] > history[1][1]  # RLlib's step counter went on from the checkpoint
    assert "the last run of 'resumable_ppo'" in cli("run", path, "--resume", expect=2).stderr


@pytest.mark.parametrize(("job", "override", "message"), [
    ("jobs/digits_mlp_sweep.yaml", "base.optim.lr=abc", "base.optim.lr: Input should be a valid number"),
    ("jobs/digits_mlp_sweep.yaml", "base.train.epochs=-1", "base.train.epochs: Input should be greater than 0"),
    ("jobs/digits_mlp_sweep.yaml", "base.foo=1", "base.foo: unknown field (valid: name, description, storage_path, "
                                                 "tracking, kind, data,"),
    ("jobs/cartpole_ppo_sweep.yaml", "base.foo=1", "base.foo: unknown field (valid: name, description, storage_path, "
                                                   "tracking, kind, algorithm,"),
    ("jobs/cartpole_ppo_sweep.yaml", "base.stop.timesteps=-5", "base.stop.timesteps: Input should be greater than 0"),
])
def test_a_sweeps_base_errors_name_the_base_path_and_its_own_fields(cli, job, override, message):
    """The base is a union of job kinds: its errors read as the base job's own, at their real path."""
    assert message in cli("validate", job, "--set", override, expect=2).stderr


@pytest.mark.slow
@pytest.mark.long  # ~20 s: a process with a local cluster of its own
def test_an_rl_job_on_its_own_local_cluster_trains_and_registers(write_spec, deepyard_home):
    """`deepyard run` as users start it, with the local cluster it starts itself (no dashboard: RLlib
    runs in the driver and needs none)."""
    import os
    import subprocess
    import sys

    spec = write_spec(spec_text(training=SMALL_PPO).replace("tiny_ppo", "own_cluster_ppo")
                      .replace("tiny-ppo", "own-cluster-ppo"))
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "deepyard.cli", "run", spec, "--json"], capture_output=True,
                          text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 2 and summary["model_version"]
    assert tracking.client().get_run(summary["run_id"]).info.status == "FINISHED"
