"""A spec's ``algorithm``, ``env``, ``training`` and ``model`` -> an RLlib AlgorithmConfig, checked first.

Every check runs before Ray starts, so a typo costs a second and exits with code 2: an unknown env
id lists the close matches, a hyperparameter the algorithm does not take is named, with the
closest one it does take.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from typing import Any

from deepyard.errors import BadInput
from deepyard.registry import closest

CONFIGS = {"ppo": "ray.rllib.algorithms.ppo:PPOConfig", "dqn": "ray.rllib.algorithms.dqn:DQNConfig",
           "sac": "ray.rllib.algorithms.sac:SACConfig", "appo": "ray.rllib.algorithms.appo:APPOConfig",
           "impala": "ray.rllib.algorithms.impala:IMPALAConfig"}
# Discrete or continuous actions: what each algorithm handles on RLlib's new API stack.
DISCRETE_ONLY, CONTINUOUS_ONLY = {"dqn"}, {"sac"}


def config_class(algorithm: str):
    module, name = CONFIGS[algorithm].split(":")
    return getattr(importlib.import_module(module), name)


def import_in_background(algorithm: str) -> threading.Thread:
    """Import RLlib (~2 s) and torch's compiler stack (~1 s, which RLlib's seeding pulls in) while
    Ray starts: the start mostly waits on other processes, so the imports come nearly free."""
    def load() -> None:
        importlib.import_module(CONFIGS[algorithm].split(":")[0])
        importlib.import_module("torch._dynamo")

    thread = threading.Thread(target=load, name="deepyard-rl-imports", daemon=True)
    thread.start()
    return thread


def accepted_hyperparameters(algorithm: str) -> set[str]:
    """The keyword arguments of ``training()`` along the config's class hierarchy."""
    names: set[str] = set()
    for cls in config_class(algorithm).__mro__:
        method = cls.__dict__.get("training")
        if method is not None:
            names |= {p for p in inspect.signature(method).parameters if p not in ("self", "kwargs")}
    return {name for name in names if not name.startswith("_")}


def make_env(env_id: str, kwargs: dict[str, Any], **extra: Any):
    """``gymnasium.make`` with the spec's arguments, or a BadInput that says what is wrong."""
    import os

    import gymnasium

    # rgb_array rendering draws off-screen: pygame needs no display and no sound card
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    known = list(gymnasium.envs.registry)
    if env_id not in known:
        matches = [m for m in (closest(env_id, known),) if m] or [k for k in known if env_id.lower() in k.lower()][:5]
        hint = f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
        raise BadInput(f"env.id: unknown gymnasium environment {env_id!r}{hint} (classic control: CartPole-v1, "
                       "Acrobot-v1, MountainCar-v0, MountainCarContinuous-v0, Pendulum-v1)")
    try:
        return gymnasium.make(env_id, **kwargs, **extra)
    except TypeError as error:
        raise BadInput(f"env.kwargs: {env_id} does not take them: {error}") from None


def check(spec) -> tuple[Any, Any]:
    """The environment's (observation space, action space); raises BadInput on anything that would fail."""
    import gymnasium

    accepted = accepted_hyperparameters(spec.algorithm)
    for name in spec.training:
        if name not in accepted:
            hint = closest(name, sorted(accepted))
            raise BadInput(f"training.{name}: {spec.algorithm} does not take {name!r}"
                           + (f"; did you mean {hint!r}?" if hint else "") + " (RLlib's training() arguments)")
    env = make_env(spec.env.id, spec.env.kwargs)
    spaces = env.observation_space, env.action_space
    env.close()
    discrete = isinstance(spaces[1], gymnasium.spaces.Discrete)
    if not isinstance(spaces[0], gymnasium.spaces.Box) or len(spaces[0].shape) != 1:
        raise BadInput(f"env.id: {spec.env.id} observes {spaces[0]}; deepyard's policies read flat vectors (Box)")
    if spec.algorithm in DISCRETE_ONLY and not discrete:
        raise BadInput(f"algorithm: {spec.algorithm} needs discrete actions; {spec.env.id} has {spaces[1]} "
                       "(use sac or ppo)")
    if spec.algorithm in CONTINUOUS_ONLY and discrete:
        raise BadInput(f"algorithm: {spec.algorithm} needs continuous actions; {spec.env.id} has {spaces[1]} "
                       "(use dqn or ppo)")
    return spaces


def _rllib_values(training: dict[str, Any]) -> dict[str, Any]:
    """YAML has lists, not tuples; RLlib reads ``n_step: (2, 5)`` as "sample from 2 to 5" only as a tuple."""
    return {name: tuple(value) if name == "n_step" and isinstance(value, list) else value
            for name, value in training.items()}


def env_maker(env_id: str, kwargs: dict[str, Any]):
    """``make(render)``: a new environment, drawing rgb_array frames when ``render`` (``policy.play``)."""
    return lambda render: make_env(env_id, kwargs, **({"render_mode": "rgb_array"} if render else {}))


def build_config(spec):
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    from deepyard.rl.policy import EPISODES_AT_ONCE

    config = (config_class(spec.algorithm)()
              .environment(spec.env.id, env_config=dict(spec.env.kwargs))
              .env_runners(num_env_runners=spec.env_runners.count,
                           num_envs_per_env_runner=spec.env_runners.envs_per_runner)
              .training(**_rllib_values(spec.training))
              .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(spec.model.hidden_sizes),
                                                         fcnet_activation=spec.model.activation,
                                                         head_fcnet_hiddens=list(spec.model.head_hidden_sizes),
                                                         head_fcnet_activation=spec.model.activation,
                                                         vf_share_layers=spec.model.vf_share_layers))
              .debugging(seed=spec.seed))
    if spec.evaluation.interval:
        # Greedy episodes in the driver's own runner: no extra process on a small machine. One
        # environment per episode, all stepped together: with the training runner's 8, 10 episodes
        # took two rounds, and each round is hundreds of steps through RLlib's connectors (CartPole:
        # 1.2 s an evaluation, 0.7 s this way).
        config = config.evaluation(evaluation_interval=spec.evaluation.interval,
                                   evaluation_duration=spec.evaluation.episodes,
                                   evaluation_duration_unit="episodes", evaluation_num_env_runners=0,
                                   evaluation_config={"explore": False,
                                                      "num_envs_per_env_runner": min(spec.evaluation.episodes,
                                                                                     EPISODES_AT_ONCE)})
    return config
