"""The critic pod's service: PPO's value function with its own optimizer and checkpoints.

    POST /values      {"prompts": [[ids]], "responses": [[ids]]} -> {"values": [[floats]]}
    POST /train_step  {"prompts", "responses", "old_values": [[floats]], "returns": [[floats]]}
                      -> {"stats": {"value_loss": .., "grad_norm": .., "lr": ..}, "optimizer_steps": n}
    POST /save        {} -> {"optimizer_steps": n}
    POST /load        {"optimizer_steps": n} -> {"optimizer_steps": n}

Served by `role_servers` (HTTP, readiness, the process). The critic is `models.Critic` with its own
AdamW and schedule (`training.criticLr`) in the engine one trainer rank would get, and it takes the
step PPO takes colocated (`recipes.ppo.value_loss_fn`: clipped value loss, micro-batched, token
weights over the whole mini-batch it is given).

State: `/save` writes `checkpoint.dir/critic/optimizer-step-<n>.pt` (model, optimizer, scheduler;
written to a temporary name, then renamed) and keeps the last `checkpoint.keep + 1`; the trainer
records n in its own checkpoint (`remote_roles.RemoteCritic` is a stateful entry of the recipe's
app_state). At start, with `checkpoint.resume`, the critic restores the state named by the
trainer's latest complete checkpoint before it reports ready, so a resumed job resumes both; a
missing state fails with ConfigError naming `runtime.checkpoint.dir`.
"""

from __future__ import annotations

import os
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .http_service import RequestError
from .role_servers import RoleService, json_floats, parse_floats, parse_sequences, role_engine


class CriticService(RoleService):
    """PPO's critic: values, the clipped value step with its own optimizer, its own checkpoints."""

    role = "critic"

    def __init__(self, cfg, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.engine = None
        self.vocab: int | None = None
        self.optimizer_steps = 0
        self.root = Path(cfg.checkpoint.dir) / "critic"

    def start(self) -> None:
        from .models import build_critic, resolve_dtype
        from .recipes.ppo import value_loss_fn
        from .tokenizer import load_tokenizer

        t, algo = self.cfg.training, self.cfg.algorithm
        vocab = load_tokenizer(self.cfg.model).vocab_size
        model = build_critic(self.cfg.model, vocab, self.device, resolve_dtype(self.cfg.model.dtype, self.device))
        self.vocab = model.config.vocab_size  # ids the model embeds, as the reference server checks them
        per_step = t.epochs_per_batch * (t.global_batch_size // t.mini_batch_size)
        self.engine = role_engine(self.cfg, model, self.device, lr=t.critic_lr,
                              total_optimizer_steps=t.total_steps * per_step)
        self.loss_fn = value_loss_fn(algo)
        self.reason = "restoring the critic's state"
        steps = self.resume_target()
        if steps:
            self._load(steps)
        self.loaded = True

    def resume_target(self) -> int:
        """The critic optimizer steps recorded in the trainer's latest complete checkpoint (0: fresh)."""
        from .checkpoint import EXTRA, Checkpointer

        if not self.cfg.checkpoint.resume:
            return 0
        ckpt = Checkpointer(self.cfg.checkpoint)
        step = ckpt.latest()
        if step is None:
            return 0
        extras = torch.load(ckpt.path(step) / EXTRA, map_location="cpu", weights_only=False)
        record = extras.get("critic")
        if not isinstance(record, dict) or "optimizer_steps" not in record:
            raise ConfigError(
                f"checkpoint {ckpt.path(step)} was written with the critic inside the trainer (spec.roles.critic "
                "unset), so it holds no critic pod state; resume it without critic pods, or start fresh with "
                "checkpoint.resume false",
                field="runtime.checkpoint.dir",
            )
        return int(record["optimizer_steps"])

    def values(self, body: Any) -> dict[str, Any]:
        prompts, responses = parse_sequences(body, self.vocab)
        return {"values": json_floats(self.engine.forward(prompts, responses).values)}

    def train_step(self, body: Any) -> dict[str, Any]:
        prompts, responses = parse_sequences(body, self.vocab, extra={"old_values", "returns"})
        extras = {k: parse_floats(body, k, responses) for k in ("old_values", "returns")}
        stats = self.engine.train_step(prompts, responses, extras, self.loss_fn)
        self.optimizer_steps += 1
        return {"stats": stats, "optimizer_steps": self.optimizer_steps}

    def path(self, steps: int) -> Path:
        return self.root / f"optimizer-step-{steps:08d}.pt"

    def save(self, body: Any) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(self.optimizer_steps)
        tmp = final.with_suffix(".tmp")
        torch.save({"optimizer_steps": self.optimizer_steps, **self.engine.state_dict()}, tmp)
        os.replace(tmp, final)
        keep = self.cfg.checkpoint.keep + 1  # the trainer's save may still fail after ours
        for old in sorted(self.root.glob("optimizer-step-*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
        return {"optimizer_steps": self.optimizer_steps}

    def load(self, body: Any) -> dict[str, Any]:
        steps = body.get("optimizer_steps") if isinstance(body, dict) else None
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "optimizer_steps: must be an integer >= 0")
        if steps != self.optimizer_steps:
            self._load(steps)
        return {"optimizer_steps": self.optimizer_steps}

    def _load(self, steps: int) -> None:
        path = self.path(steps)
        if not path.is_file():
            raise ConfigError(
                f"the trainer's checkpoint needs the critic's state after {steps} optimizer steps, but {path} "
                "is missing (a checkpoint directory the critic pod does not share?)",
                field="runtime.checkpoint.dir",
            )
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.engine.load_state_dict(state)
        self.optimizer_steps = steps
        print(f"kuberl critic: restored its state after {steps} optimizer steps from {path}", flush=True)
