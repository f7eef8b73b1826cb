"""`deepyard rl eval`: play a registered policy in its environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from deepyard.cli.app import app, err, user_errors

rl_app = typer.Typer(no_args_is_help=True, help="Reinforcement-learning policies: evaluate a registered one.")
app.add_typer(rl_app, name="rl")


@rl_app.command("eval")
@user_errors
def rl_eval(
    model: Annotated[str, typer.Argument(help="registered policy: NAME (newest version), NAME:VERSION or NAME@ALIAS")],
    episodes: Annotated[int, typer.Option(min=1, help="greedy episodes to play")] = 10,
    render: Annotated[Optional[Path], typer.Option(help="write the first episode as a GIF here")] = None,
    seed: Annotated[int, typer.Option(help="seeds the episodes' resets")] = 0,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Play a registered policy in its environment; print the mean and std of the returns."""
    from deepyard.rl.evaluate import evaluate

    result = evaluate(model, episodes=episodes, seed=seed, render=render)
    err.print(f"{result['model']} version {result['version']} on {result['env_id']}: mean return "
              f"{result['mean_return']:.2f} ± {result['std_return']:.2f} over {episodes} episodes"
              + (f"; GIF: {render}" if render else ""))
    if json_output:
        print(json.dumps(result))
