"""PPO with a critic and a reference model (Schulman et al. 2017; Ouyang et al. 2022, InstructGPT).

Per step: sample one completion per prompt (or samplesPerPrompt); score it; compute the
policy's and the frozen reference's log-probs and the critic's values on every response token;
subtract coef x KL(policy || reference) from the per-token reward (algorithm.klIn: reward, the
default) or add it to the loss (klIn: loss); estimate advantages and returns with GAE (gamma,
lambda; whitened unless normalizeAdvantageStd is false); then for epochsPerBatch passes over
mini-batches, take a clipped policy step and a clipped value step.

When the critic takes exactly one optimizer step per batch (epochsPerBatch 1, miniBatchSize =
globalBatchSize, the critic in this process: `value_pass_folds`), the separate no-grad value pass
is folded into the critic's update, which then runs first: its training forward sees the weights
before the step, i.e. the values GAE needs, and computes GAE's returns per micro-batch inside its
loss (`critic_step_with_gae`); the policy's advantages, whitened over the whole batch, come after
it from the values it returns. Same numbers, one critic forward fewer.

The critic is the policy's backbone with a zero-initialised value head (models.Critic); the value
of response token t is read at the hidden state that predicts it, i.e. before emitting it.

Run it: any RLJob with `runtime.algorithm.name: ppo`, e.g. the demo with
    algorithm: {name: ppo, samplesPerPrompt: 1}   ->   kuberl local job.yaml
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kuberl_runtime.algorithms import apply_kl_to_rewards, get_advantage, kl_penalty, masked_mean, policy_loss, value_loss
from kuberl_runtime.engines import MicroBatch

from .common import Job, chunks, pad, response_mask, sequence_rewards, unpad, weighted_sum


def ppo(job: Job, *, fold_value_pass: bool = True) -> None:
    """The PPO loop; fold_value_pass=False keeps the separate value pass where folding is exact."""
    algo, train = job.cfg.algorithm, job.cfg.training
    policy = job.train_engine(job.build_policy(), lr=train.lr)
    # roles.critic / roles.reference set: their pods (remote_roles clients), else models in this process.
    critic = job.critic_override or job.train_engine(job.build_critic(), lr=train.critic_lr)
    reference = (job.reference_override or job.reference_engine()) if algo.needs_reference else None
    rollout = job.rollout_engine(policy)
    advantage_fn = get_advantage(algo.advantage)
    fold = fold_value_pass and value_pass_folds(job)
    if fold:
        job.note("ppo: one critic step per batch: its update computes the values for GAE (no separate value pass)")

    app_state = {"model": policy.module, "optimizer": policy.optimizer, "scheduler": policy.scheduler}
    if job.critic_override is not None:
        app_state["critic"] = critic  # saves/restores its state on the critic pod
    else:
        app_state.update(critic=critic.module, critic_optimizer=critic.optimizer, critic_scheduler=critic.scheduler)
    start = job.resume(app_state)
    if start:
        rollout.update_weights(policy.named_weights(), version=start)

    for step in job.steps(start):
        m: dict[str, float] = {}

        # ---- rollout
        rows, prompts = job.next_batch()
        rollout.wake()
        with job.timed(m, "generate"):
            gen = rollout.generate(prompts, job.sampling(step))
        rollout.sleep()
        responses = gen.response_ids
        mask = response_mask(responses)  # (B, T)

        # ---- reward, reference and critic: everything the advantages need, without grad
        with job.timed(m, "score"):
            scores = job.score(rows, gen)  # (B,)
            old = policy.forward(prompts, responses, entropy=True)
            ref_logp = reference.forward(prompts, responses).logprobs if reference else None
            old_values = None if fold else critic.forward(prompts, responses).values

        # ---- per-token rewards: the score on the last token, KL-shaped
        with torch.no_grad():
            token_rewards = sequence_rewards(scores, responses)  # (B, T)
            if ref_logp is not None and algo.kl_in == "reward":
                token_rewards, kl = apply_kl_to_rewards(
                    token_rewards, pad(old.logprobs), pad(ref_logp), mask, algo.kl_type, algo.kl_coef
                )
                m["train/kl"] = masked_mean(kl, mask).item()

        # ---- folded: the critic's one step on this batch first; its forward gives the values
        if fold:
            with job.timed(m, "train"):
                rewards = unpad(token_rewards, responses)
                old_values, c_stats = critic_step_with_gae(critic, prompts, responses, rewards, algo)

        # ---- advantages: GAE, whitened over the batch
        with torch.no_grad():
            adv, returns = advantage_fn(
                token_rewards=token_rewards, mask=mask, values=pad(old_values),
                group_size=algo.samples_per_prompt, gamma=algo.gamma, lam=algo.lam,
                normalize_std=algo.normalize_advantage_std,
            )  # fmt: skip
        extras = {
            "advantages": unpad(adv, responses),
            "returns": unpad(returns, responses),
            "old_logprobs": old.logprobs,
            "old_values": old_values,
        }
        if ref_logp is not None and algo.kl_in == "loss":
            extras["ref_logprobs"] = ref_logp

        def policy_loss_fn(mb: MicroBatch):
            # A scaled by the token weight: see grpo.py and engines/torch_train.py.
            loss, stats = policy_loss(
                mb.logprobs, mb.extras["old_logprobs"], mb.extras["advantages"] * mb.weight, mb.mask,
                clip_low=algo.clip_ratio_low, clip_high=algo.clip_ratio_high,
                dual_clip_c=algo.dual_clip, aggregation="token-sum",
            )  # fmt: skip
            stats["policy_loss"] = loss.detach() / (mb.weight * mb.mask).sum().clamp(min=1e-12)
            if "ref_logprobs" in mb.extras:
                kl = kl_penalty(mb.logprobs, mb.extras["ref_logprobs"], algo.kl_type)
                loss = loss + algo.kl_coef * weighted_sum(kl, mb)
                stats["kl"] = masked_mean(kl.detach(), mb.mask)
            if algo.entropy_coef:
                loss = loss - algo.entropy_coef * weighted_sum(mb.entropy, mb)
            return loss, stats

        # ---- update: policy and critic (unless folded above), epochsPerBatch passes over the mini-batches
        with job.timed(m, "train"):
            parts = chunks(len(prompts), train.global_batch_size // train.mini_batch_size)
            for _ in range(train.epochs_per_batch):
                for part in parts:
                    sub = {k: v[part] for k, v in extras.items()}
                    p_stats = policy.train_step(
                        prompts[part], responses[part], sub, policy_loss_fn,
                        aggregation=algo.loss_aggregation, entropy=bool(algo.entropy_coef),
                    )  # fmt: skip
                    if not fold:
                        c_stats = critic.train_step(prompts[part], responses[part], sub, value_loss_fn(algo))

        # ---- weight sync
        with job.timed(m, "sync"):
            rollout.update_weights(policy.named_weights(), version=step)

        # ---- log / checkpoint
        n_tokens = float(mask.sum())
        m.update(
            {
                "reward/mean": scores.mean().item(),
                "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
                "rollout/response_length": n_tokens / len(responses),
                "rollout/tokens_per_s": n_tokens / max(m["time/generate_s"], 1e-9),
                "train/entropy": masked_mean(pad(old.entropy), mask).item(),
                "critic/values_mean": masked_mean(pad(old_values), mask).item(),
                **{f"train/{k}": v for k, v in p_stats.items()},
                **{f"critic/{k}": v for k, v in c_stats.items()},
            }
        )
        m["time/step_s"] = sum(m[f"time/{p}_s"] for p in ("generate", "score", "train", "sync"))
        job.log(step, job.mean_over_ranks(m), weights_version=step)
        job.maybe_save(step, app_state)
    job.finish()


def value_loss_fn(algo):
    """The critic's loss: clipped value loss per token (also what a critic pod runs, role_servers)."""

    def loss_fn(mb: MicroBatch):
        # 0.5 (v - R)^2 is not homogeneous in anything we can scale, so weight per token here.
        clip = algo.value_clip
        v, v_old, ret = mb.values, mb.extras["old_values"], mb.extras["returns"]
        unclipped = (v - ret) ** 2
        if clip is None:
            per_token = 0.5 * unclipped
        else:
            per_token = 0.5 * torch.maximum(unclipped, (v_old + (v - v_old).clamp(-clip, clip) - ret) ** 2)
        _, stats = value_loss(v.detach(), v_old, ret, mb.mask, clip=clip)
        loss = weighted_sum(per_token, mb)
        stats["value_loss"] = loss.detach() / (mb.weight * mb.mask).sum().clamp(min=1e-12)
        return loss, stats

    return loss_fn


def value_pass_folds(job: Job) -> bool:
    """Whether the critic's update can stand in for the value pass: one critic step per batch, on
    the whole batch, with GAE (which reads the values), in this process (a critic pod runs
    value_loss_fn with the targets sent to it)."""
    algo, train = job.cfg.algorithm, job.cfg.training
    one_step = train.epochs_per_batch == 1 and train.mini_batch_size == train.global_batch_size
    return one_step and algo.advantage == "gae" and job.critic_override is None


def critic_step_with_gae(critic, prompts, responses, token_rewards, algo):
    """The critic's one optimizer step on the batch, its targets computed inside its loss: per
    micro-batch, values (detached) -> GAE with the rows' token rewards -> returns -> value loss.
    Returns the per-sequence (R_i,) values its forward saw, and the step's metrics.

    Why this equals a no-grad value pass, GAE, then critic.train_step (value_pass_folds): the
    forward runs on the weights before the step (gradients of all micro-batches are accumulated,
    the optimizer steps after the last), so its values are the pass's values; GAE runs along each
    row, so a micro-batch holds everything its rows' returns need; and v_old = v makes the value
    clip a no-op, as it is in the first step after a separate pass. Only whitening the policy's
    advantages needs the whole batch, and the caller does it from the returned values.
    """
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, mask, values) per micro-batch
    gae, loss_with_targets = get_advantage("gae"), value_loss_fn(algo)

    def loss_fn(mb: MicroBatch):
        v = mb.values.detach()  # (B, T)
        _, returns = gae(
            token_rewards=mb.extras["token_rewards"], mask=mb.mask, values=v,
            group_size=1, gamma=algo.gamma, lam=algo.lam, normalize_std=False,
        )  # fmt: skip
        seen.append((mb.extras["row"][:, 0], mb.mask, v))  # read back after the step: no sync here
        return loss_with_targets(replace(mb, extras={**mb.extras, "old_values": v, "returns": returns}))

    rows = [torch.full((r.numel(),), float(i)) for i, r in enumerate(responses)]
    stats = critic.train_step(prompts, responses, {"token_rewards": token_rewards, "row": rows}, loss_fn)
    # Micro-batches are the engine's (sorted by length): the "row" extra says whose values these are.
    values = [torch.zeros(0) for _ in responses]
    for row, mask, v in seen:
        lengths = mask.sum(-1).tolist()
        for i, n, seq in zip(row.tolist(), lengths, v[mask].cpu().split(lengths), strict=True):
            if n:
                values[int(i)] = seq
    return values, stats
