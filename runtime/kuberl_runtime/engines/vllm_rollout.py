"""vLLM as the rollout engine (`rollout.engine: vllm`, the optional `kuberl[vllm]` extra; GPU only).

    engine = VLLMRolloutEngine.from_config(cfg, tokenizer)     # LLM(model=cfg.model.path, ...)
    gen = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=256))
    engine.update_weights(named_tensors, version)              # model.load_weights in every worker
    engine.sleep(); engine.wake()                              # vLLM sleep mode (level 1)

Only vLLM's public surface is used: `vllm.LLM` with `enable_sleep_mode=True`, `LLM.generate` on
token-id prompts with `vllm.SamplingParams(logprobs=0)` (the sampled token's log-prob),
`LLM.collective_rpc` to run the model's own `load_weights` inside every worker (vLLM shards
tensor-parallel weights itself there, so full tensors go in), and `LLM.sleep` / `LLM.wake_up`.
Log-probs are requested as `processed_logprobs` (after temperature) where the installed vLLM knows
that mode, which is what the train engine recomputes; with top-k/top-p set, vLLM's processed
log-probs are those of the filtered distribution.

vLLM is not installed in CI (it needs a CUDA build that does not fit the test machines), so this
adapter is exercised only by the `gpu` test that runs where `import vllm` works. Without vLLM,
choosing it fails at start with a ConfigError naming the field.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterable

import torch

from ..errors import ConfigError
from .base import Generation, SamplingParams

LOAD_CHUNK_BYTES = 256 << 20  # tensors handed to the workers per collective_rpc call
FIELD = "runtime.rollout.engine"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"rollout.engine is vllm but vLLM cannot be imported ({e}); install the extra "
            "(pip install 'kuberl[vllm]') in the rollout image, or use engine: builtin",
            field=FIELD,
        ) from None
    return vllm


def _load_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside each vLLM worker (collective_rpc): the model's own loader shards TP weights."""
    model = worker.model_runner.model
    device = next(model.parameters()).device
    model.load_weights(weights=[(n, t.to(device, non_blocking=True)) for n, t in weights])
    return len(weights)


class VLLMRolloutEngine:
    def __init__(self, llm, *, vocab_size: int | None = None) -> None:
        self.llm = llm
        self.vocab_size = vocab_size
        self.weights_version = 0

    @classmethod
    def from_config(cls, cfg, tokenizer=None) -> VLLMRolloutEngine:
        """An `LLM` on the configured checkpoint; vLLM needs files, so model.init is refused."""
        vllm = _require_vllm()
        source = cfg.model.path or cfg.model.hub_id
        if source is None:
            raise ConfigError(
                "the vLLM engine loads a checkpoint: set model.path (or hubId); model.init works only "
                "with engine: builtin",
                field=FIELD,
            )
        kwargs = dict(
            model=source,
            revision=cfg.model.revision,
            tensor_parallel_size=cfg.rollout.tensor_parallel_size,
            gpu_memory_utilization=cfg.rollout.gpu_memory_fraction,
            dtype="auto" if cfg.model.dtype == "auto" else cfg.model.dtype,
            enforce_eager=not cfg.rollout.cuda_graphs,
            enable_sleep_mode=True,
            skip_tokenizer_init=True,  # token ids in, token ids out
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.training.seed,
        )
        try:
            llm = vllm.LLM(logprobs_mode="processed_logprobs", **kwargs)
        except TypeError:  # a vLLM older than logprobs_mode: raw log-probs, exact at temperature 1
            llm = vllm.LLM(**kwargs)
        return cls(llm, vocab_size=getattr(tokenizer, "vocab_size", None))

    def generate(self, prompts: list[torch.Tensor], params: SamplingParams) -> Generation:
        vllm = _require_vllm()
        t0 = time.perf_counter()
        sp = vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            ignore_eos=params.ignore_eos,
            seed=params.seed,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
        )
        inputs = [{"prompt_token_ids": p.tolist()} for p in prompts]
        outputs = self.llm.generate(inputs, sp, use_tqdm=False)
        responses, logprobs = [], []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            responses.append(torch.tensor(ids, dtype=torch.long))
            logprobs.append(torch.tensor([step[t].logprob for t, step in zip(ids, c.logprobs)], dtype=torch.float32))
        elapsed = time.perf_counter() - t0
        n = sum(r.numel() for r in responses)
        return Generation(
            prompt_ids=list(prompts), response_ids=responses, response_logprobs=logprobs,
            metrics={"rollout/tokens_per_s": n / max(elapsed, 1e-9), "time/generate_s": elapsed},
        )  # fmt: skip

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Hand full tensors to every worker's `load_weights`, ~LOAD_CHUNK_BYTES per call."""
        chunk, size = [], 0
        for name, t in named_tensors:
            chunk.append((name, t))
            size += t.numel() * t.element_size()
            if size >= LOAD_CHUNK_BYTES:
                self.llm.collective_rpc(_load_weights, args=(chunk,))
                chunk, size = [], 0
        if chunk:
            self.llm.collective_rpc(_load_weights, args=(chunk,))
        self.weights_version = version

    def sleep(self) -> None:
        """Level 1: weights offloaded to CPU memory, KV cache dropped."""
        self.llm.sleep(level=1)

    def wake(self) -> None:
        self.llm.wake_up()
