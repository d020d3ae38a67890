"""GRPO: group-relative policy optimisation, no critic (Shao et al. 2024, arXiv:2402.03300).

For every prompt, sample k completions; score them; each completion's advantage is its reward
minus its group's mean (divided by the group's std unless algorithm.normalizeAdvantageStd is
false, which is Dr. GRPO); then take PPO-clipped policy-gradient steps on those advantages, with an
optional k3 KL penalty to a frozen reference in the loss. `algorithm.advantage: rloo` swaps in the
leave-one-out baseline with the same loop.

With one optimizer step per rollout batch (the default: miniBatchSize = globalBatchSize,
epochsPerBatch = 1) the policy that sampled is the policy being trained, so the "old" log-probs are
the current ones detached (ratio = 1 in value, the gradient is plain REINFORCE with a group
baseline) and no extra forward pass is spent recomputing them.

Run it:
    kuberl local examples/demo-cpu.yaml                        # on this machine
    KUBERL_CONFIG=config.yaml kuberl-runtime                   # inside a pod (the operator does this)
"""

from __future__ import annotations

import torch

from kuberl_runtime.algorithms import get_advantage, kl_penalty, masked_mean, policy_loss
from kuberl_runtime.engines import MicroBatch

from .common import Job, chunks, response_mask, sequence_rewards, unpad, weighted_sum


def grpo(job: Job) -> None:
    algo, train = job.cfg.algorithm, job.cfg.training
    policy = job.train_engine(job.build_policy(), lr=train.lr)
    reference = (job.reference_override or job.reference_engine()) if algo.needs_reference else None  # pods or local
    rollout = job.rollout_engine(policy)
    advantage_fn = get_advantage(algo.advantage)
    on_policy = train.mini_batch_size == train.global_batch_size and train.epochs_per_batch == 1

    app_state = {"model": policy.module, "optimizer": policy.optimizer, "scheduler": policy.scheduler}
    start = job.resume(app_state)
    if start:
        rollout.update_weights(policy.named_weights(), version=start)

    for step in job.steps(start):
        m: dict[str, float] = {}

        # ---- rollout: this rank's prompts, each samplesPerPrompt times in a row (one GRPO group)
        rows, prompts = job.next_batch()
        rollout.wake()
        with job.timed(m, "generate"):
            gen = rollout.generate(prompts, job.sampling(step))
        rollout.sleep()  # free the KV cache before training takes the memory
        responses = gen.response_ids
        mask = response_mask(responses)  # (B, T)

        # ---- reward (and the reference model's log-probs for the KL term)
        with job.timed(m, "score"):
            scores = job.score(rows, gen)  # (B,)
            ref_logp = reference.forward(prompts, responses).logprobs if reference else None
            old_logp = None if on_policy else policy.forward(prompts, responses).logprobs

        # ---- advantages: group-relative, on the sequence score placed on the last token
        with torch.no_grad():
            adv, _ = advantage_fn(
                token_rewards=sequence_rewards(scores, responses),
                mask=mask,
                values=None,
                group_size=algo.samples_per_prompt,
                gamma=algo.gamma,
                lam=algo.lam,
                normalize_std=algo.normalize_advantage_std,
            )
        extras = {"advantages": unpad(adv, responses)}
        if ref_logp is not None:
            extras["ref_logprobs"] = ref_logp
        if old_logp is not None:
            extras["old_logprobs"] = old_logp

        def loss_fn(mb: MicroBatch):
            old = mb.extras["old_logprobs"] if "old_logprobs" in mb.extras else mb.logprobs.detach()
            # The clipped loss is positively homogeneous in A, so scaling A by the token weight
            # w > 0 scales each token's loss by w: "token-sum" of that is this micro-batch's
            # exact share of the mini-batch aggregate (see engines/torch_train.py).
            loss, stats = policy_loss(
                mb.logprobs, old, mb.extras["advantages"] * mb.weight, mb.mask,
                clip_low=algo.clip_ratio_low, clip_high=algo.clip_ratio_high,
                dual_clip_c=algo.dual_clip, aggregation="token-sum",
            )  # fmt: skip
            stats["policy_loss"] = loss.detach() / (mb.weight * mb.mask).sum().clamp(min=1e-12)  # weighted mean
            if "ref_logprobs" in mb.extras:
                kl = kl_penalty(mb.logprobs, mb.extras["ref_logprobs"], algo.kl_type)  # (B, T)
                loss = loss + algo.kl_coef * weighted_sum(kl, mb)
                stats["kl"] = masked_mean(kl.detach(), mb.mask)
            if algo.entropy_coef:
                loss = loss - algo.entropy_coef * weighted_sum(mb.entropy, mb)
            stats["entropy"] = masked_mean(mb.entropy.detach(), mb.mask)
            return loss, stats

        # ---- update: epochsPerBatch passes, one optimizer step per mini-batch
        with job.timed(m, "train"):
            parts = chunks(len(prompts), train.global_batch_size // train.mini_batch_size)
            for _ in range(train.epochs_per_batch):
                for part in parts:
                    stats = policy.train_step(
                        prompts[part], responses[part], {k: v[part] for k, v in extras.items()}, loss_fn,
                        aggregation=algo.loss_aggregation, entropy=True,
                    )  # fmt: skip

        # ---- weight sync: colocated, the rollout engine already runs these parameters
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
                **{f"train/{k}": v for k, v in stats.items()},
            }
        )
        m["time/step_s"] = sum(m[f"time/{p}_s"] for p in ("generate", "score", "train", "sync"))
        job.log(step, job.mean_over_ranks(m), weights_version=step)
        job.maybe_save(step, app_state)
    job.finish()
