"""The algorithms package against loop-by-loop references.

Every reference below is plain Python over nested lists of floats (float64), one row and one
token at a time, written from the papers' formulas rather than from the vectorised code, so a
broken mask, an off-by-one in a group or a wrong clip shows up as a mismatch. Inputs carry large
garbage at masked-out positions: anything the code reads there changes the result.
"""

import math
import uuid

import pytest
import torch
from kuberl_runtime.algorithms import (
    aggregate,
    apply_kl_to_rewards,
    entropy_from_logits,
    get_advantage,
    get_aggregation,
    get_kl,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    register_advantage,
    value_loss,
)
from torch.utils._python_dispatch import TorchDispatchMode

F64 = torch.float64
SHAPES = [(1, 1), (2, 5), (3, 4), (5, 9), (8, 16)]  # (B, T)
AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
MASK_KINDS = ["right-pad", "holes", "all-masked"]
GARBAGE = 1e3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ---------------------------------------------------------------- fixture builders


def make_mask(batch, length, kind="right-pad"):
    """(B, T) bool. right-pad: random lengths 0..T, and row 1 empty when B >= 3 (an empty
    response); holes: random gaps inside rows (multi-turn observation tokens); all-masked;
    single: one valid token per row (row 0's first token, the last row's last, others anywhere);
    recipe: what the recipes and the train engines' micro-batches hold (response_mask): each row
    a prefix of 1..T tokens, the longest exactly T, rows sorted by length."""
    if kind == "all-masked":
        return torch.zeros(batch, length, dtype=torch.bool)
    if kind == "single":
        position = torch.randint(0, length, (batch,))
        position[0], position[-1] = 0, length - 1
        return torch.arange(length) == position[:, None]
    if kind == "recipe":
        lengths = torch.randint(1, length + 1, (batch,))
        lengths[0] = length
        return torch.arange(length) < lengths.sort(descending=True).values[:, None]
    if kind == "holes":
        mask = torch.rand(batch, length) < 0.7
    else:
        lengths = torch.randint(0, length + 1, (batch,))
        mask = torch.arange(length) < lengths[:, None]
    if batch >= 3:
        mask[1] = False
    return mask


def with_garbage(x, mask):
    """x where mask is 1, large values elsewhere: padding must never be read."""
    return torch.where(mask, x, GARBAGE * (1 + torch.rand(x.shape, dtype=x.dtype)))


def make_rewards(mask, kind):
    """(B, T) float64. dense: a reward on every token; binary: 0/1 on each row's last valid token
    (the usual verifiable-reward case, which produces tied groups)."""
    if kind == "dense":
        rewards = torch.randn(mask.shape, dtype=F64)
    else:
        rewards = torch.zeros(mask.shape, dtype=F64)
        for b, row in enumerate(mask.tolist()):
            valid = [t for t, m in enumerate(row) if m]
            if valid:
                rewards[b, valid[-1]] = float(torch.randint(0, 2, ()).item())
    return with_garbage(rewards, mask)


# ---------------------------------------------------------------- references


def ref_scores(r, m):
    return [sum(rv for rv, mv in zip(rr, mm) if mv) for rr, mm in zip(r, m)]


def ref_grpo(r, m, k, normalize_std, eps):
    scores, out = ref_scores(r, m), []
    for b, s in enumerate(scores):
        group = scores[b // k * k : b // k * k + k]
        a = 0.0
        if k > 1:
            mean = sum(group) / k
            a = s - mean
            if normalize_std:
                std = math.sqrt(sum((g - mean) ** 2 for g in group) / (k - 1))
                a = a / (std + eps)
        out.append([a if mv else 0.0 for mv in m[b]])
    return out, out


def ref_rloo(r, m, k):
    scores, out = ref_scores(r, m), []
    for b, s in enumerate(scores):
        group = scores[b // k * k : b // k * k + k]
        a = 0.0 if k == 1 else s - (sum(group) - s) / (k - 1)
        out.append([a if mv else 0.0 for mv in m[b]])
    return out, out


def ref_whiten(x, m, eps):
    vals = [xv for xr, mr in zip(x, m) for xv, mv in zip(xr, mr) if mv]
    out = [[0.0] * len(row) for row in x]
    if len(vals) < 2:
        return out
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    for b, (xr, mr) in enumerate(zip(x, m)):
        for t, (xv, mv) in enumerate(zip(xr, mr)):
            if mv:
                out[b][t] = (xv - mean) / math.sqrt(var + eps)
    return out


def ref_gae(r, v, m, gamma, lam, normalize_std, eps):
    adv = [[0.0] * len(row) for row in r]
    ret = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        next_value, running = 0.0, 0.0
        for t in reversed(range(len(r[b]))):
            if not m[b][t]:
                continue
            delta = r[b][t] + gamma * next_value - v[b][t]
            running = delta + gamma * lam * running
            adv[b][t], ret[b][t] = running, running + v[b][t]
            next_value = v[b][t]
    return (ref_whiten(adv, m, eps) if normalize_std else adv), ret


def ref_aggregate(x, m, mode):
    rows = [[xv for xv, mv in zip(xr, mr) if mv] for xr, mr in zip(x, m)]
    tokens = [xv for row in rows for xv in row]
    nonempty = [row for row in rows if row]
    if mode == "token-sum":
        return sum(tokens)
    if mode == "token-mean":
        return sum(tokens) / len(tokens) if tokens else 0.0
    per_row = [sum(row) / len(row) if mode == "seq-mean-token-mean" else sum(row) for row in nonempty]
    return sum(per_row) / len(per_row) if per_row else 0.0


def ref_kl(lp, rl, kind):
    if kind == "k1":
        return lp - rl
    if kind == "k2":
        return 0.5 * (lp - rl) ** 2
    log_ratio = min(max(rl - lp, -20.0), 20.0)
    return min(max(math.exp(log_ratio) - log_ratio - 1, -10.0), 10.0)


def ref_policy_loss(lp, olp, adv, m, clip_low, clip_high, c, mode):
    loss = [[0.0] * len(row) for row in lp]
    n = n_clip = n_dual = 0
    kl_sum = ratio_sum = 0.0
    for b in range(len(lp)):
        for t in range(len(lp[b])):
            if not m[b][t]:
                continue
            log_ratio = min(max(lp[b][t] - olp[b][t], -20.0), 20.0)
            ratio, a = math.exp(log_ratio), adv[b][t]
            surrogate = -a * ratio
            clipped = -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
            token_loss = max(surrogate, clipped)
            n_clip += clipped > surrogate
            if c is not None and a < 0 and token_loss > -c * a:
                token_loss, n_dual = -c * a, n_dual + 1
            loss[b][t] = token_loss
            n, kl_sum, ratio_sum = n + 1, kl_sum - log_ratio, ratio_sum + ratio
    d = max(n, 1)
    metrics = {"clipfrac": n_clip / d, "approx_kl": kl_sum / d, "ratio_mean": ratio_sum / d}
    if c is not None:
        metrics["dual_clipfrac"] = n_dual / d
    return ref_aggregate(loss, m, mode), metrics


def ref_value_loss(v, ov, ret, m, clip, mode):
    loss = [[0.0] * len(row) for row in v]
    n = n_clip = 0
    for b in range(len(v)):
        for t in range(len(v[b])):
            if not m[b][t]:
                continue
            unclipped = (v[b][t] - ret[b][t]) ** 2
            token_loss = 0.5 * unclipped
            if clip is not None:
                v_clipped = ov[b][t] + min(max(v[b][t] - ov[b][t], -clip), clip)
                clipped = (v_clipped - ret[b][t]) ** 2
                token_loss = 0.5 * max(unclipped, clipped)
                n_clip += clipped > unclipped
            loss[b][t] = token_loss
            n += 1
    return ref_aggregate(loss, m, mode), {"vf_clipfrac": n_clip / max(n, 1)}


def ref_logsumexp(row):
    top = max(row)
    return top + math.log(sum(math.exp(z - top) for z in row))


def ref_logprob(row, label):
    return row[label] - ref_logsumexp(row)


def ref_entropy(row):
    lse = ref_logsumexp(row)
    return -sum(math.exp(z - lse) * (z - lse) for z in row)


def flat_rows(logits):
    """(..., V) -> list of V-lists, in the order of (...).flatten()."""
    return logits.reshape(-1, logits.shape[-1]).tolist()


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "get, known",
    [
        (get_advantage, ["gae", "grpo", "rloo"]),
        (get_kl, ["k1", "k2", "k3"]),
        (get_aggregation, AGGREGATIONS),
    ],
)
def test_registry_unknown_name_lists_the_known_ones(get, known):
    with pytest.raises(ValueError, match="unknown .*'no-such-thing'") as err:
        get("no-such-thing")
    for name in known:
        assert name in str(err.value)


def test_registry_rejects_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda **_: None)


def test_registry_serves_a_user_registered_estimator():
    name = f"test-{uuid.uuid4().hex}"

    @register_advantage(name)
    def constant(*, token_rewards, mask, **_):
        return torch.ones_like(token_rewards), torch.ones_like(token_rewards)

    assert get_advantage(name) is constant


@pytest.mark.parametrize(
    "kind, call",
    [
        ("kl", lambda: kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")),
        ("aggregation", lambda: aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")),
    ],
)
def test_helpers_route_unknown_names_to_the_registry_error(kind, call):
    with pytest.raises(ValueError, match=f"unknown {kind}"):
        call()


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("name", ["grpo", "rloo", "gae"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_every_estimator_honours_the_shared_contract(name, dtype):
    mask = make_mask(6, 7)
    rewards = make_rewards(mask, "dense").to(dtype)
    values = with_garbage(torch.randn(6, 7, dtype=dtype), mask)
    adv, ret = get_advantage(name)(
        token_rewards=rewards, mask=mask, values=values, group_size=3, gamma=1.0, lam=0.95, normalize_std=True
    )
    for out in (adv, ret):
        assert out.shape == (6, 7) and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert (out[~mask] == 0).all()


@pytest.mark.parametrize("name", ["grpo", "rloo"])
@pytest.mark.parametrize("batch, group_size", [(1, 1), (4, 1), (4, 2), (4, 4), (6, 3), (8, 4), (8, 8)])
@pytest.mark.parametrize("length", [1, 7])
@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("reward_kind", ["dense", "binary"])
def test_group_baselines_match_reference(name, batch, group_size, length, normalize_std, reward_kind):
    mask = make_mask(batch, length)
    rewards = make_rewards(mask, reward_kind)
    adv, ret = get_advantage(name)(
        token_rewards=rewards, mask=mask, values=None, group_size=group_size,
        gamma=1.0, lam=1.0, normalize_std=normalize_std, eps=1e-6,
    )
    r, m = rewards.tolist(), mask.tolist()
    if name == "grpo":
        exp_adv, exp_ret = ref_grpo(r, m, group_size, normalize_std, 1e-6)
    else:
        exp_adv, exp_ret = ref_rloo(r, m, group_size)
    close(adv, exp_adv)
    close(ret, exp_ret)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
@pytest.mark.parametrize("batch, group_size", [(6, 4), (4, 0), (4, -2)])
def test_group_size_must_divide_the_batch(name, batch, group_size):
    with pytest.raises(ValueError, match="group_size"):
        get_advantage(name)(
            token_rewards=torch.zeros(batch, 3), mask=torch.ones(batch, 3), values=None,
            group_size=group_size, gamma=1.0, lam=1.0, normalize_std=True,
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize("normalize_std", [False, True])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_gae_matches_reference(shape, gamma, lam, normalize_std, mask_kind):
    mask = make_mask(*shape, mask_kind)
    rewards = make_rewards(mask, "dense")
    values = with_garbage(torch.randn(shape, dtype=F64), mask)
    adv, ret = get_advantage("gae")(
        token_rewards=rewards, mask=mask, values=values, group_size=1,
        gamma=gamma, lam=lam, normalize_std=normalize_std, eps=1e-6,
    )
    exp_adv, exp_ret = ref_gae(
        rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam, normalize_std, 1e-6
    )
    close(adv, exp_adv)
    close(ret, exp_ret)


@pytest.mark.parametrize("batch, length", [(6, 512), (64, 256)])  # long rows; a W2 critic micro-batch
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (1.0, 0.0)])
@pytest.mark.parametrize("mask_kind", [*MASK_KINDS, "single", "recipe"])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_gae_long_rows_match_reference(batch, length, gamma, lam, mask_kind, dtype, tol):
    mask = make_mask(batch, length, mask_kind)
    rewards = make_rewards(mask, "dense").to(dtype)
    values = with_garbage(torch.randn(batch, length, dtype=F64), mask).to(dtype)
    adv, ret = get_advantage("gae")(
        token_rewards=rewards, mask=mask, values=values, group_size=1,
        gamma=gamma, lam=lam, normalize_std=False,
    )
    # The reference runs on the very same (float32) inputs in float64, so only our arithmetic is measured.
    exp_adv, exp_ret = ref_gae(rewards.to(F64).tolist(), values.to(F64).tolist(), mask.tolist(), gamma, lam, False, 0)
    for out, expected in ((adv, exp_adv), (ret, exp_ret)):
        # Float32 error grows with the sums' magnitude (up to ~50 here at gamma * lam = 1), not with
        # a token's own value: the absolute tolerance scales with the largest expected value.
        scale = max([1.0] + [abs(x) for row in expected for x in row])
        assert out.dtype == dtype
        torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), rtol=tol, atol=tol * scale)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_gae_runs_a_number_of_tensor_ops_that_does_not_grow_with_the_length():
    # Each tensor op is a kernel launch on a GPU: a loop over T (several ops per token) makes GAE
    # launch-bound at T = 256, once per critic micro-batch. The scan adds a few ops per doubling of T.
    def ops(length):
        mask = make_mask(4, length, "holes")
        with CountOps() as count:
            get_advantage("gae")(
                token_rewards=torch.randn(4, length), mask=mask, values=torch.randn(4, length),
                group_size=1, gamma=1.0, lam=0.95, normalize_std=True,
            )  # fmt: skip
        return count.ops

    assert ops(1024) < 1.5 * ops(32)


def test_gae_needs_values():
    with pytest.raises(ValueError, match="values"):
        get_advantage("gae")(
            token_rewards=torch.zeros(2, 3), mask=torch.ones(2, 3), values=None,
            group_size=1, gamma=1.0, lam=1.0, normalize_std=False,
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_masked_mean_matches_reference(shape, mask_kind, dim):
    mask = make_mask(*shape, mask_kind)
    x = with_garbage(torch.randn(shape, dtype=F64), mask)
    rows, m = x.tolist(), mask.tolist()
    if dim is None:
        vals = [xv for xr, mr in zip(rows, m) for xv, mv in zip(xr, mr) if mv]
        expected = sum(vals) / len(vals) if vals else 0.0
    else:
        if dim == 0:
            rows, m = [list(c) for c in zip(*rows)], [list(c) for c in zip(*m)]
        expected = [sum(xv for xv, mv in zip(xr, mr) if mv) / max(sum(mr), 1) for xr, mr in zip(rows, m)]
    close(masked_mean(x, mask, dim=dim), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_masked_whiten_matches_reference(shape, mask_kind):
    mask = make_mask(*shape, mask_kind)
    x = with_garbage(3 + 2 * torch.randn(shape, dtype=F64), mask)
    close(masked_whiten(x, mask), ref_whiten(x.tolist(), mask.tolist(), 1e-8))


# ---------------------------------------------------------------- KL


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spread", [0.3, 3.0, 40.0])  # 40 drives k3 into both of verl's clamps
def test_kl_estimators_match_reference(kind, shape, spread):
    logp = -3 * torch.rand(shape, dtype=F64)
    ref_logp = logp + spread * torch.randn(shape, dtype=F64)
    expected = [
        [ref_kl(a, b, kind) for a, b in zip(ra, rb)] for ra, rb in zip(logp.tolist(), ref_logp.tolist())
    ]
    close(get_kl(kind)(logp, ref_logp), expected)
    close(kl_penalty(logp, ref_logp, kind), expected)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("coef", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_kl_in_reward_matches_reference(kind, shape, coef, mask_kind):
    mask = make_mask(*shape, mask_kind)
    rewards = torch.randn(shape, dtype=F64)
    logp = with_garbage(-3 * torch.rand(shape, dtype=F64), mask)
    ref_logp = -3 * torch.rand(shape, dtype=F64)
    new_rewards, kl = apply_kl_to_rewards(rewards, logp, ref_logp, mask, kind, coef)
    exp_kl = [[ref_kl(a, b, kind) if mv else 0.0 for a, b, mv in zip(ra, rb, mr)]
              for ra, rb, mr in zip(logp.tolist(), ref_logp.tolist(), mask.tolist())]
    exp_rewards = [[r - coef * k for r, k in zip(rr, kr)] for rr, kr in zip(rewards.tolist(), exp_kl)]
    close(kl, exp_kl)
    close(new_rewards, exp_rewards)


# ---------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_aggregations_match_reference(mode, shape, mask_kind):
    mask = make_mask(*shape, mask_kind)
    x = with_garbage(torch.randn(shape, dtype=F64), mask)
    expected = ref_aggregate(x.tolist(), mask.tolist(), mode)
    close(aggregate(x, mask, mode), expected)
    close(get_aggregation(mode)(x, mask.to(F64)), expected)  # a float 0/1 mask means the same


# ---------------------------------------------------------------- policy loss


def make_policy_batch(shape, mask_kind):
    mask = make_mask(*shape, mask_kind)
    old_logp = -3 * torch.rand(shape, dtype=F64)
    logp = with_garbage(old_logp + 0.8 * torch.randn(shape, dtype=F64), mask)  # ratios ~ e^{+-2}
    advantages = torch.randn(shape, dtype=F64)
    return logp, old_logp, advantages, mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip_low, clip_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.3), (0.0, 0.0)])
@pytest.mark.parametrize("dual_clip_c", [None, 3.0])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_policy_loss_matches_reference(shape, clip_low, clip_high, dual_clip_c, aggregation, mask_kind):
    logp, old_logp, advantages, mask = make_policy_batch(shape, mask_kind)
    loss, metrics = policy_loss(
        logp, old_logp, advantages, mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c, aggregation=aggregation,
    )
    exp_loss, exp_metrics = ref_policy_loss(
        logp.tolist(), old_logp.tolist(), advantages.tolist(), mask.tolist(),
        clip_low, clip_high, dual_clip_c, aggregation,
    )
    close(loss, exp_loss)
    assert set(metrics) == set(exp_metrics)
    for key, value in exp_metrics.items():
        close(metrics[key], value)
    if shape == (8, 16) and mask_kind != "all-masked":
        # The data must reach every branch, or a broken clip would pass unnoticed.
        assert 0 < exp_metrics["clipfrac"] < 1
        assert dual_clip_c is None or exp_metrics["dual_clipfrac"] > 0


@pytest.mark.parametrize(
    "advantage, ratio, clip_high, dual_clip_c, expected",
    [
        (1.0, 1.0, 0.2, None, -1.0),  # on-policy: the plain policy gradient
        (1.0, 1.5, 0.2, None, -1.2),  # good token pushed past 1 + eps: gradient stops
        (1.0, 1.5, 0.28, None, -1.28),  # clip-higher lets it go further
        (1.0, 0.5, 0.2, None, -0.5),  # pessimistic bound: the unclipped term is larger
        (-1.0, 0.5, 0.2, None, 0.8),  # bad token pushed below 1 - eps: gradient stops
        (-1.0, 5.0, 0.2, None, 5.0),  # bad token whose ratio exploded: unbounded without dual clip
        (-1.0, 5.0, 0.2, 3.0, 3.0),  # dual clip caps it at -c * A
        (-1.0, 2.0, 0.2, 3.0, 2.0),  # under the cap: unchanged
        (1.0, 5.0, 0.2, 3.0, -1.2),  # dual clip never touches positive advantages
    ],
)
def test_policy_loss_worked_examples(advantage, ratio, clip_high, dual_clip_c, expected):
    old_logp = torch.tensor([[-1.0]], dtype=F64)
    logp = old_logp + math.log(ratio)
    loss, _ = policy_loss(
        logp, old_logp, torch.tensor([[advantage]], dtype=F64), torch.ones(1, 1),
        clip_low=0.2, clip_high=clip_high, dual_clip_c=dual_clip_c,
    )
    close(loss, expected)


@pytest.mark.parametrize("dual_clip_c", [1.0, 0.5, 0.0, -3.0])
def test_dual_clip_needs_c_above_one(dual_clip_c):
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), dual_clip_c=dual_clip_c
        )


@pytest.mark.parametrize("clip_low, clip_high", [(-0.1, 0.2), (1.0, 0.2), (0.2, -0.1)])
def test_policy_loss_rejects_impossible_clip_ranges(clip_low, clip_high):
    with pytest.raises(ValueError, match="clip"):
        policy_loss(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
            clip_low=clip_low, clip_high=clip_high,
        )


# ---------------------------------------------------------------- value loss


def make_value_batch(shape, mask_kind):
    mask = make_mask(*shape, mask_kind)
    old_values = torch.randn(shape, dtype=F64)
    values = with_garbage(old_values + 0.3 * torch.randn(shape, dtype=F64), mask)
    return values, old_values, torch.randn(shape, dtype=F64), mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [None, 0.1, 0.2, 1.0])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_value_loss_matches_reference(shape, clip, aggregation, mask_kind):
    values, old_values, returns, mask = make_value_batch(shape, mask_kind)
    loss, metrics = value_loss(values, old_values, returns, mask, clip=clip, aggregation=aggregation)
    exp_loss, exp_metrics = ref_value_loss(
        values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist(), clip, aggregation
    )
    close(loss, exp_loss)
    close(metrics["vf_clipfrac"], exp_metrics["vf_clipfrac"])
    if shape == (8, 16) and mask_kind != "all-masked" and clip == 0.1:
        assert 0 < exp_metrics["vf_clipfrac"] < 1


# ---------------------------------------------------------------- gradients


def policy_loss_fn(aggregation):
    return lambda *batch: policy_loss(*batch, clip_high=0.28, dual_clip_c=3.0, aggregation=aggregation)[0]


def value_loss_fn(aggregation):
    return lambda *batch: value_loss(*batch, clip=0.2, aggregation=aggregation)[0]


LOSSES = [(policy_loss_fn, make_policy_batch), (value_loss_fn, make_value_batch)]


@pytest.mark.parametrize("make_loss, make_batch", LOSSES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_gradients_reach_only_masked_in_tokens(make_loss, make_batch, aggregation, mask_kind):
    x, *rest, mask = make_batch((8, 16), mask_kind)
    x.requires_grad_(True)
    make_loss(aggregation)(x, *rest, mask).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
    if mask_kind != "all-masked":
        assert (x.grad[mask] != 0).any()


@pytest.mark.parametrize("make_loss, make_batch", LOSSES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_gradients_match_finite_differences(make_loss, make_batch, aggregation):
    x, *rest, mask = make_batch((3, 4), "right-pad")
    x = torch.where(mask, x, 0.0).requires_grad_(True)  # finite differences would step over clamps
    assert torch.autograd.gradcheck(lambda x: make_loss(aggregation)(x, *rest, mask), (x,))


# ---------------------------------------------------------------- log-probs and entropy


LOGIT_SHAPES = [(3,), (2, 5), (2, 3, 4)]  # the (...) in (..., V)


@pytest.mark.parametrize("lead", LOGIT_SHAPES)
@pytest.mark.parametrize("vocab", [2, 50, 300])
@pytest.mark.parametrize("scale", [1.0, 200.0])  # 200: exp() overflows unless logsumexp is shifted
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-9), (torch.float32, 1e-5)])
def test_logprobs_and_entropy_match_reference(lead, vocab, scale, dtype, tol):
    logits = (scale * torch.randn(*lead, vocab, dtype=F64)).to(dtype)
    labels = torch.randint(0, vocab, lead)
    rows = flat_rows(logits.to(F64))
    exp_logp = [ref_logprob(row, label) for row, label in zip(rows, labels.flatten().tolist())]
    exp_entropy = [ref_entropy(row) for row in rows]
    logp, entropy = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    assert logp.shape == entropy.shape == lead and logp.dtype == entropy.dtype == dtype
    close(logp.flatten(), exp_logp, tol * scale)
    close(entropy.flatten(), exp_entropy, tol * scale)


@pytest.mark.parametrize("vocab", [1000, 4096])
def test_bf16_logits_are_computed_in_float32(vocab):
    # Reference: float64 on the very same bf16 values, so only our arithmetic is measured.
    tol = 1e-4
    logits = (8 * torch.randn(4, 3, vocab)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (4, 3))
    rows = flat_rows(logits.to(F64))
    exp_logp = [ref_logprob(row, label) for row, label in zip(rows, labels.flatten().tolist())]
    exp_entropy = [ref_entropy(row) for row in rows]
    logp, entropy = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    assert logp.dtype == entropy.dtype == torch.float32
    close(logp.flatten(), exp_logp, tol)
    close(entropy.flatten(), exp_entropy, tol)
    # The tolerance is tight enough to catch the naive bf16 computation.
    naive = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert (naive.to(F64).flatten() - torch.tensor(exp_logp, dtype=F64)).abs().max() > 10 * tol


def test_entropy_worked_examples():
    close(entropy_from_logits(torch.zeros(7, dtype=F64)), math.log(7))  # uniform: log V
    peaked = torch.tensor([1000.0, 0.0, 0.0], dtype=F64)
    close(entropy_from_logits(peaked), 0.0)  # certain: 0, not NaN


def test_logprob_and_entropy_gradients_match_finite_differences():
    logits = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 3))
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, labels), (logits,))
    assert torch.autograd.gradcheck(entropy_from_logits, (logits,))
