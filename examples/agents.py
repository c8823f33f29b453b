"""The RL side of the example: a batched CartPole in plain torch, and the policy that learns to balance it.

Nothing here knows about bgsave. The policy lives in this module, not in the training script, because
``save_agent`` pickles the whole module: pickle records a class by its import path, and a class defined in
a script's ``__main__`` cannot be found again by any other script. ``python examples/train_rl.py`` puts
``examples/`` on ``sys.path``, so this module is ``agents`` there and in every process that loads a
checkpoint with ``examples/`` on its path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_STEPS = 200  # an episode ends after this many steps: the best possible return


class CartPole:
    """``num_envs`` carts with a pole on each, stepped together (Barto, Sutton & Anderson 1983; gym's constants).

    Reward is 1 for every step the pole stays up; an episode ends when it falls or the cart leaves the track.
    """

    gravity, cart_mass, pole_mass, half_length, force, dt = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    x_limit, angle_limit = 2.4, 12 * math.pi / 180

    def __init__(self, num_envs: int, generator: torch.Generator) -> None:
        # Start near upright, at random: the generator makes every rollout reproducible.
        self.state = torch.rand(num_envs, 4, generator=generator) * 0.1 - 0.05

    def step(self, action: torch.Tensor) -> torch.Tensor:
        """Push each cart left (0) or right (1); returns which poles fell."""
        x, x_dot, theta, theta_dot = self.state.unbind(1)
        force = (action.float() * 2 - 1) * self.force
        total_mass = self.cart_mass + self.pole_mass
        pole_moment = self.pole_mass * self.half_length
        cos, sin = theta.cos(), theta.sin()
        temp = (force + pole_moment * theta_dot**2 * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * temp) / (
            self.half_length * (4 / 3 - self.pole_mass * cos**2 / total_mass)
        )
        x_acc = temp - pole_moment * theta_acc * cos / total_mass
        x, theta = x + self.dt * x_dot, theta + self.dt * theta_dot
        x_dot, theta_dot = x_dot + self.dt * x_acc, theta_dot + self.dt * theta_acc
        self.state = torch.stack([x, x_dot, theta, theta_dot], dim=1)
        return (self.state[:, 0].abs() > self.x_limit) | (self.state[:, 2].abs() > self.angle_limit)


class Policy(nn.Module):
    """A small MLP from the cart's state to the logits of pushing left or right."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def rollout(
    policy: Policy, num_envs: int, generator: torch.Generator, *, greedy: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Play ``num_envs`` episodes at once.

    Returns:
        ``(log_probs, alive)``, both ``[steps, num_envs]``: the log-probability of each action taken,
        and 1.0 where the episode was still running at that step (its reward), else 0.0.
    """
    env = CartPole(num_envs, generator)
    alive = torch.ones(num_envs, dtype=torch.bool)
    log_probs, alives = [], []
    for _ in range(MAX_STEPS):
        logits = policy(env.state)
        if greedy:
            action = logits.argmax(dim=1)
        else:
            action = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
        log_probs.append(logits.log_softmax(dim=1).gather(1, action[:, None]).squeeze(1))
        alives.append(alive)
        alive = alive & ~env.step(action)
        if not alive.any():
            break
    return torch.stack(log_probs), torch.stack(alives).float()
