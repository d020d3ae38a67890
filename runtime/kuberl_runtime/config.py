"""The runtime configuration: everything the in-pod program reads, as pydantic models.

One source of truth: the operator embeds `RuntimeConfig` as `spec.runtime` of an RLJob, the CRD
schema is generated from it, the operator renders it into the job's ConfigMap, and the runtime
parses the same YAML back. This module imports no torch.

Field names are camelCase in YAML (`maxNewTokens`) and snake_case in Python (`max_new_tokens`).
Every field's description becomes `kubectl explain` text.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

MODULE_FUNCTION = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"


class Model(BaseModel):
    """Base of every API model: camelCase aliases, unknown fields rejected (typos fail loudly)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        validate_assignment=True,
    )


class SecretKeyRef(Model):
    """A key of a Secret in the job's namespace."""

    name: str = Field(description="Name of the Secret in the job's namespace.", min_length=1)
    key: str = Field(description="Key inside the Secret whose value is used.", min_length=1)


# --------------------------------------------------------------------------------------- model


class ModelInit(Model):
    """A randomly initialised model built from an architecture config: demos, tests, benchmarks."""

    architecture: Literal["qwen2", "llama"] = Field(
        "qwen2", description="transformers architecture to instantiate (qwen2 or llama)."
    )
    hidden_size: int = Field(64, ge=8, description="Hidden size (d_model).")
    num_layers: int = Field(2, ge=1, description="Number of decoder layers.")
    num_heads: int = Field(4, ge=1, description="Number of attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Number of key/value heads (grouped-query attention).")
    intermediate_size: int = Field(128, ge=1, description="MLP intermediate size.")
    vocab_size: int | None = Field(
        None, ge=2, description="Vocabulary size. Default: the tokenizer's vocabulary size."
    )
    max_position_embeddings: int = Field(2048, ge=16, description="Longest sequence in tokens.")
    tie_word_embeddings: bool = Field(True, description="Share input embedding and LM head weights.")
    seed: int = Field(0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _heads(self) -> ModelInit:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hiddenSize: must be divisible by numHeads ({self.num_heads}), got {self.hidden_size}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"numHeads: must be divisible by numKvHeads ({self.num_kv_heads}), got {self.num_heads}"
            )
        return self


class ModelConfig(Model):
    """The policy model: exactly one of `path`, `hubId` or `init`."""

    path: str | None = Field(
        None, description="Directory of a transformers checkpoint on a mounted volume (config.json + weights)."
    )
    hub_id: str | None = Field(
        None, description="Hub model id, downloaded at start. Needs network access from the pods."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hubId.")
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding the hub token; exported to the pods as HF_TOKEN."
    )
    init: ModelInit | None = Field(
        None, description="Build a randomly initialised model from this config instead of loading one."
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer directory, or `builtin:<name>` for a tokenizer made locally "
        "(builtin:arithmetic). Default: the model's own directory.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Parameter dtype of the engines. auto: bfloat16 on GPUs, float32 on CPUs."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel passed to transformers. auto: sdpa."
    )
    trust_remote_code: bool = Field(False, description="Allow model code shipped with the checkpoint.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [n for n, v in (("path", self.path), ("hubId", self.hub_id), ("init", self.init)) if v]
        if len(given) != 1:
            raise ValueError(
                f"exactly one of path, hubId or init must be set (got {', '.join(given) or 'none'})"
            )
        if self.init is not None and not self.tokenizer:
            raise ValueError("tokenizer: is required with init (e.g. builtin:arithmetic)")
        return self


# ---------------------------------------------------------------------------------------- data


class SyntheticData(Model):
    """A verifiable task generated in-process: no files needed (the demo job uses it)."""

    task: Literal["arithmetic", "reverse", "copy"] = Field(
        "arithmetic", description="arithmetic: `a+b=` -> sum; reverse/copy: a digit string -> its reverse/copy."
    )
    num_examples: int = Field(4096, ge=1, description="Number of prompts generated.")
    max_operand: int = Field(99, ge=1, description="arithmetic: largest operand; reverse/copy: digits per string.")
    seed: int = Field(0, description="Seed of the generator.")


class DataConfig(Model):
    """Prompts: a JSONL/Parquet file on a volume, or a synthetic task."""

    path: str | None = Field(None, description="Prompt file on a mounted volume (.jsonl or .parquet).")
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="File format. auto: from the file extension."
    )
    prompt_key: str = Field("prompt", description="Column holding the prompt text.")
    answer_key: str = Field("answer", description="Column holding the reference answer given to the reward.")
    max_prompt_length: int = Field(512, ge=1, description="Prompts longer than this (in tokens) are left-truncated.")
    shuffle: bool = Field(True, description="Shuffle the prompts every epoch.")
    seed: int = Field(0, description="Seed of the shuffle.")
    synthetic: SyntheticData | None = Field(None, description="Generate prompts instead of reading a file.")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("exactly one of path or synthetic must be set")
        return self


# ----------------------------------------------------------------------------------- algorithm

AdvantageName = Literal["grpo", "rloo", "gae"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]


class AlgorithmConfig(Model):
    """The RL algorithm and its hyper-parameters."""

    name: Literal["grpo", "ppo"] = Field(
        "grpo", description="grpo: group-relative advantages, no critic. ppo: critic + GAE."
    )
    recipe: str | None = Field(
        None,
        pattern=MODULE_FUNCTION,
        description="A custom loop as `module:function`, replacing the built-in recipe for `name`.",
    )
    samples_per_prompt: int = Field(
        8, ge=1, description="Completions sampled per prompt (the GRPO group size)."
    )
    advantage: AdvantageName | None = Field(
        None, description="Advantage estimator: grpo, rloo or gae. Default: grpo for grpo, gae for ppo."
    )
    normalize_advantage_std: bool = Field(
        True, description="Divide group-relative advantages by the group's std (GRPO); whiten GAE advantages."
    )
    clip_ratio_low: float = Field(0.2, gt=0, lt=1, description="PPO clip range below 1 (1 - low).")
    clip_ratio_high: float = Field(0.2, gt=0, description="PPO clip range above 1 (1 + high); >low is DAPO's clip-higher.")
    dual_clip: float | None = Field(
        None, gt=1, description="Dual-clip constant c (> 1) bounding the loss of negative advantages. Off when unset."
    )
    loss_aggregation: Aggregation = Field(
        "token-mean", description="How per-token losses are reduced: token-mean, seq-mean-token-mean, seq-mean-token-sum, token-sum."
    )
    kl_type: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator against the reference model.")
    kl_coef: float | None = Field(
        None, ge=0, description="KL coefficient. Default: 0 for grpo (no reference model), 0.001 for ppo."
    )
    kl_in: Literal["reward", "loss"] | None = Field(
        None, description="Where the KL penalty goes. Default: loss for grpo, reward for ppo."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient in the policy loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor for GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    value_clip: float | None = Field(0.2, gt=0, description="Value-function clip range (PPO critic). Off when unset.")

    @model_validator(mode="after")
    def _derive(self) -> AlgorithmConfig:
        # Derived defaults are filled in once here so every reader sees the same values.
        ppo = self.name == "ppo"
        if self.advantage is None:
            self.advantage = "gae" if ppo else "grpo"
        if self.kl_coef is None:
            self.kl_coef = 0.001 if ppo else 0.0
        if self.kl_in is None:
            self.kl_in = "reward" if ppo else "loss"
        if self.advantage == "gae" and not ppo:
            raise ValueError("advantage: gae needs a critic, which only name ppo trains")
        if self.advantage in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(
                f"samplesPerPrompt: must be at least 2 with advantage {self.advantage} (a group to compare)"
            )
        return self

    @property
    def needs_reference(self) -> bool:
        return bool(self.kl_coef)

    @property
    def needs_critic(self) -> bool:
        return self.advantage == "gae"


# ------------------------------------------------------------------------------------- rollout


class RolloutConfig(Model):
    """Generation: the engine and the sampling parameters."""

    engine: Literal["builtin", "fast", "hf", "vllm"] = Field(
        "builtin",
        description="builtin: the fast engine (CUDA graphs) on a GPU for Qwen2/Llama, else the transformers one. "
        "fast, hf: force either (fast also runs on CPU). vllm: the vLLM adapter (rollout pods).",
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold; 1 disables it.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it.")
    max_new_tokens: int = Field(256, ge=1, description="Tokens generated per completion at most.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence (benchmarks).")
    tensor_parallel_size: int = Field(
        1, ge=1, description="Tensor-parallel degree of each engine replica (GPUs per engine); 1 with the "
        "built-in engines (only vllm is tensor-parallel). A disaggregated rollout pod runs gpus / tensorParallelSize "
        "engine replicas."
    )
    gpu_memory_fraction: float = Field(
        0.5, gt=0, le=0.95, description="Share of GPU memory the engine may use for weights and KV cache."
    )
    cuda_graphs: bool = Field(True, description="Capture the decode step in CUDA graphs (GPU only).")
    max_batch_size: int | None = Field(
        None, ge=1, description="Sequences decoded together at most. Default: all of a step's sequences."
    )

    @model_validator(mode="after")
    def _tp_needs_vllm(self) -> RolloutConfig:
        if self.engine != "vllm" and self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensorParallelSize: must be 1 unless engine is vllm (kuberl's built-in engines are not "
                f"tensor-parallel), got {self.tensor_parallel_size} with engine {self.engine}; use engine: vllm "
                "for tensor parallelism"
            )
        return self


# ------------------------------------------------------------------------------------ training


class TrainingConfig(Model):
    """Optimisation: batch sizes, learning rates, precision and memory savers."""

    engine: Literal["auto", "fast", "torch"] = Field(
        "auto",
        description="auto: the fast engine (bf16 + float32 masters, fused AdamW, packing) for one trainer process on "
        "one GPU with Qwen2/Llama, else torch (FSDP2 on GPUs, plain on CPU). fast, torch: force either.",
    )
    total_steps: int = Field(100, ge=1, description="RL steps (rollout + update) to run.")
    global_batch_size: int = Field(
        64, ge=1, description="Prompts per step; sequences per step = globalBatchSize x samplesPerPrompt."
    )
    mini_batch_size: int | None = Field(
        None, ge=1, description="Prompts per optimizer step. Default: globalBatchSize (one update per step)."
    )
    micro_batch_size: int = Field(
        8, ge=1, description="Sequences per forward/backward on one trainer rank (gradient accumulation is derived)."
    )
    epochs_per_batch: int = Field(1, ge=1, description="Passes over each rollout batch (PPO epochs).")
    lr: float = Field(1e-6, gt=0, description="Policy learning rate (AdamW).")
    critic_lr: float = Field(1e-5, gt=0, description="Critic learning rate (AdamW, PPO only).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up length in optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; off when unset.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    cpu_offload: bool = Field(False, description="Keep parameters and optimizer state on the CPU between phases (FSDP2).")
    logprob_chunk_size: int = Field(
        1024, ge=1, description="Tokens whose vocabulary logits exist at once when computing log-probs."
    )
    seed: int = Field(0, description="Seed for sampling and initialisation.")

    @model_validator(mode="after")
    def _batches(self) -> TrainingConfig:
        if self.mini_batch_size is None:
            self.mini_batch_size = self.global_batch_size
        if self.global_batch_size % self.mini_batch_size:
            raise ValueError(
                f"miniBatchSize: must divide globalBatchSize ({self.global_batch_size}), got {self.mini_batch_size}"
            )
        return self


# -------------------------------------------------------------------------------------- reward


class RewardConfig(Model):
    """How completions are scored: a built-in rule, a user function, or a reward model."""

    rule: Literal["exact_match", "regex", "numeric"] | None = Field(
        None,
        description="Built-in rule: exact_match (stripped text equals the answer), regex (pattern matches), "
        "numeric (last number in the completion equals the answer). Default: numeric when nothing else is set.",
    )
    pattern: str | None = Field(None, description="Regular expression for the regex rule.")
    function: str | None = Field(
        None,
        pattern=MODULE_FUNCTION,
        description="User reward as `module:function`, called as fn(prompt, completion, row) -> float.",
    )
    model: str | None = Field(
        None, description="Reward-model checkpoint directory (sequence classification head)."
    )
    python_path: list[str] = Field(
        default_factory=list, description="Directories prepended to sys.path before importing `function`."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> RewardConfig:
        given = [n for n, v in (("rule", self.rule), ("function", self.function), ("model", self.model)) if v]
        if len(given) > 1:
            raise ValueError(f"set only one of rule, function or model (got {', '.join(given)})")
        if not given:
            self.rule = "numeric"
        if self.rule == "regex":
            if not self.pattern:
                raise ValueError("pattern: is required with rule regex")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern: not a valid regular expression ({e})") from e
        return self

    @property
    def kind(self) -> Literal["rule", "function", "model"]:
        return "function" if self.function else "model" if self.model else "rule"


# ------------------------------------------------------------------------- checkpoint, logging


class CheckpointConfig(Model):
    """Checkpoints (torch.distributed.checkpoint) and resume after a restart."""

    dir: str = Field("/checkpoints", description="Directory of the checkpoints; a shared volume in a cluster.")
    interval: int = Field(50, ge=1, description="Save every this many steps (and at the last step).")
    keep: int = Field(3, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    resume: bool = Field(True, description="Resume from the latest complete checkpoint when one exists.")
    volume: dict[str, Any] | None = Field(
        None,
        description="Kubernetes volume source mounted at `dir` in trainer pods, e.g. "
        "{persistentVolumeClaim: {claimName: ckpt}}. Default: an emptyDir (lost when the pod goes).",
    )


class WandbConfig(Model):
    """Weights & Biases experiment tracking."""

    project: str = Field(description="W&B project.", min_length=1)
    entity: str | None = Field(None, description="W&B entity (team).")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding the W&B API key; exported to the trainer as WANDB_API_KEY."
    )


class LoggingConfig(Model):
    """Metrics, progress and experiment tracking."""

    tensorboard_dir: str | None = Field(None, description="Write TensorBoard event files here.")
    wandb: WandbConfig | None = Field(None, description="Log to Weights & Biases when wandb is installed.")
    port: int = Field(
        8470, ge=1024, le=65535,
        description="Port of every pod's HTTP endpoint: /progress, /metrics, /healthz. Engine replica i of a "
        "rollout pod serves on port + i, which must stay at most 65535. Not 29500, trainer rank 0's rendezvous port.",
    )
    log_every: int = Field(1, ge=1, description="Print and log metrics every this many steps.")


# ---------------------------------------------------------------------------------------- root


class RuntimeConfig(Model):
    """Everything the runtime reads; embedded as `spec.runtime` of an RLJob."""

    model: ModelConfig = Field(description="The policy model.")
    data: DataConfig = Field(description="The prompts.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="The RL algorithm.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation engine and sampling.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Scoring of completions.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints and resume.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics and tracking.")

    @property
    def sequences_per_step(self) -> int:
        return self.training.global_batch_size * self.algorithm.samples_per_prompt

    def check_world(self, trainer_ranks: int) -> None:
        """Batch sizes must split evenly over the trainer ranks; raises ValueError naming the field."""
        mini_seqs = self.training.mini_batch_size * self.algorithm.samples_per_prompt
        if mini_seqs % trainer_ranks:
            raise ValueError(
                f"training.miniBatchSize: {self.training.mini_batch_size} prompts x algorithm.samplesPerPrompt "
                f"{self.algorithm.samples_per_prompt} = {mini_seqs} sequences must split evenly over "
                f"{trainer_ranks} trainer ranks"
            )
        per_rank = mini_seqs // trainer_ranks
        if per_rank % self.training.micro_batch_size:
            raise ValueError(
                f"training.microBatchSize: must divide the {per_rank} sequences each trainer rank gets per "
                f"optimizer step, got {self.training.micro_batch_size}"
            )

    def to_yaml_dict(self) -> dict[str, Any]:
        """The camelCase document written into the job's ConfigMap (defaults filled in)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
