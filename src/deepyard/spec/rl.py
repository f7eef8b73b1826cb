"""`kind: rl`: an RLlib agent on a gymnasium environment (`runners/rl.py`); it can be a sweep's base."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from deepyard.spec.kinds import job_kind
from deepyard.spec.sections import JobBase, RegisterSpec, Section


class EnvSpec(Section):
    id: str = Field(description="a registered gymnasium id: CartPole-v1, Acrobot-v1, Pendulum-v1, MountainCar-v0...")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for gymnasium.make")


class EnvRunnersSpec(Section):
    count: int = Field(1, ge=0, description="EnvRunner actors sampling in parallel (0: sample in the driver)")
    envs_per_runner: PositiveInt = Field(1, description="vectorized environments in each runner")


class PolicyNetSpec(Section):
    hidden_sizes: list[PositiveInt] = Field(default_factory=lambda: [64, 64], description="the policy's MLP layers")
    activation: Literal["tanh", "relu", "silu", "linear"] = "tanh"
    head_hidden_sizes: list[PositiveInt] = Field(default_factory=list, description="hidden layers of the output "
                                                 "heads (e.g. DQN's dueling value and advantage streams)")
    vf_share_layers: bool = Field(False, description="the value function shares the policy's hidden layers "
                                  "(RLlib's default; separate networks, as in stable-baselines3, learn "
                                  "CartPole several times faster with PPO)")


class RLStopSpec(Section):
    """Stop at whichever comes first."""

    mean_return: float | None = Field(None, description="the evaluation mean return to reach (the training "
                                                         "return without evaluation)")
    timesteps: PositiveInt | None = Field(100_000, description="environment steps sampled")
    time_s: PositiveFloat | None = Field(None, description="seconds of training")
    iterations: PositiveInt | None = Field(None, description="training iterations")


class RLEvaluationSpec(Section):
    interval: int = Field(1, ge=0, description="evaluate every N iterations with the greedy policy (0: never)")
    episodes: PositiveInt = Field(10, description="episodes per evaluation")


class RLCheckpointSpec(Section):
    every_n_iterations: PositiveInt = Field(10, description="save the algorithm's state every N iterations")


@job_kind(runner="deepyard.runners.rl", resumable=True, trials="deepyard.runners.rl_trials")
class RLJob(JobBase):
    """A reinforcement-learning agent trained by RLlib on a gymnasium environment (`deepyard run`)."""

    kind: Literal["rl"]
    algorithm: Literal["ppo", "dqn", "sac", "appo", "impala"]
    env: EnvSpec
    env_runners: EnvRunnersSpec = Field(default_factory=EnvRunnersSpec)
    training: dict[str, Any] = Field(default_factory=dict, description="the algorithm's hyperparameters, RLlib's "
                                     "names: lr, gamma, lambda_, train_batch_size_per_learner, minibatch_size, "
                                     "num_epochs, entropy_coeff, clip_param...")
    model: PolicyNetSpec = Field(default_factory=PolicyNetSpec)
    stop: RLStopSpec = Field(default_factory=RLStopSpec)
    evaluation: RLEvaluationSpec = Field(default_factory=RLEvaluationSpec)
    checkpoint: RLCheckpointSpec = Field(default_factory=RLCheckpointSpec)
    seed: int = 0
    register: RegisterSpec = Field(default_factory=RegisterSpec)

    @property
    def model_name(self) -> str:
        return self.register.model_name or self.name

    def footprint(self, trial: bool = False) -> dict[str, float]:
        # one CPU per EnvRunner; the learner is the driver's process, or the trial's CPU in a sweep
        return {"CPU": float(self.env_runners.count + trial)}
