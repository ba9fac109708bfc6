"""Generation engines of a replica: token ids in, generated token ids out.

An engine knows nothing of HTTP, text or stop strings (:mod:`zeroplane.runtime.serve.text` does that); it
takes a :class:`Job` and yields the new token ids as they come. Closing the iterator (the client went away,
a stop string appeared, the deadline passed) stops that job's generation.

``serve.engine`` picks one:

* ``continuous`` (the default) — :class:`ContinuousBatchingEngine`: transformers' own continuous batching
  (``model.init_continuous_batching()`` → ``ContinuousBatchingManager``: a paged KV cache and a background
  loop that adds and retires requests between forward passes). Every request — greedy or sampled,
  streaming or not — joins the running batch at the next step; a closed job is cancelled and its KV blocks
  freed before the next step.
* ``generate`` — :class:`GenerateEngine`: non-streaming requests go through ``@serve.batch``; greedy ones in a
  batch share one left-padded ``model.generate`` call, sampled ones run one by one with their own seed;
  streams run token by token under one lock. The engine before continuous batching, kept as the baseline
  the serving benchmark compares against.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
import uuid
from typing import Any, AsyncIterator, Optional

import torch
from ray import serve

from zeroplane.runtime.serve.protocol import GREEDY_TEMPERATURE_EPS, Job, ServeSpec

logger = logging.getLogger("ray.serve")

#: The serving defaults (``ServeSpec``'s): the ``@serve.batch`` settings a replica starts from.
_SERVE_DEFAULTS = ServeSpec()


def context_length(config: Any) -> Optional[int]:
    """The model's context window in tokens from its Hugging Face config (first of ``n_positions``,
    ``max_position_embeddings``, ``n_ctx``, ``seq_length``, ``max_sequence_length``), or None."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(local: str, tokenizer: Any) -> tuple[Any, torch.device]:
    """The causal LM of the Hugging Face folder ``local`` in float32 on the replica's GPU if it has one, else
    CPU, in eval mode, its generation defaults replaced by the tokenizer's eos / pad / bos (request fields
    alone decide how to generate). Returns ``(model, device)``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).to(device).eval()
    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=pad_id(tokenizer), bos_token_id=tokenizer.bos_token_id
    )
    return model, device


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else eos (padding is masked out), else 0 (any id is filler)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


class PastDeadline:
    """A ``generate`` stopping criterion: row ``i`` is done once ``time.monotonic()`` reaches ``deadlines[i]``
    (so a timed-out request stops using the model after the token in flight)."""

    def __init__(self, deadlines: list[float]) -> None:
        self._deadlines = torch.tensor(deadlines, dtype=torch.float64)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return (self._deadlines <= time.monotonic()).to(input_ids.device)


class _StreamState:
    """Decoding state of one streamed job (KV cache, next input, its sampling generator)."""

    def __init__(self, prompt_ids: list[int], seed: Optional[int]) -> None:
        self.past: Any = None
        self.next_input = torch.tensor([prompt_ids], dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))


class GenerateEngine:
    """The ``generate`` engine (see the module docstring).

    Args:
        model: the loaded causal LM (:func:`load_model`).
        device: its device.
        eos_id: end-of-sequence id or None; pad: padding id.
        max_batch_size: most non-streaming jobs per ``@serve.batch`` batch (``max_batch_size``).
        batch_wait_timeout_s: seconds a batch waits to fill (``batch_wait_timeout_s``).
    """

    name = "generate"

    def __init__(self, model: Any, device: torch.device, eos_id: Optional[int], pad: int,
                 max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self._model = model
        self._device = device
        self._eos_id = eos_id
        self._pad_id = pad
        self.context = context_length(model.config)
        self._lock = threading.Lock()
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def warmup(self) -> None:
        """Nothing to warm up: the first ``generate`` call costs no more than the next ones."""

    def health(self) -> Optional[str]:
        """Always None: this engine has no background thread to wedge."""
        return None

    def shutdown(self) -> None:
        """Nothing to stop."""

    async def generate(self, job: Job, stream: bool) -> AsyncIterator[list[int]]:
        """New token ids of ``job``: one list at the end (``stream`` false, batched) or one id per step.

        Raises:
            TimeoutError: the job passed its deadline before it was generated.
        """
        if not stream:
            out = await self._generate_batch(job)
            if out is None:
                raise TimeoutError("past the deadline")
            yield out
            return
        state = _StreamState(job.prompt_ids, job.seed)
        for _ in range(job.max_tokens):
            token = await asyncio.to_thread(self._next_token, state, job)
            yield [token]
            if self._eos_id is not None and token == self._eos_id:
                return

    @serve.batch(max_batch_size=_SERVE_DEFAULTS.max_batch_size,
                 batch_wait_timeout_s=_SERVE_DEFAULTS.batch_wait_timeout_s)
    async def _generate_batch(self, jobs: list[Job]) -> list[Optional[list[int]]]:
        """Generate for a batch of jobs; returns each one's new token ids (may end with eos), or None for a job
        that reached its deadline first."""
        return await asyncio.to_thread(self._run_jobs, jobs)

    def _run_jobs(self, jobs: list[Job]) -> list[Optional[list[int]]]:
        results: list[Optional[list[int]]] = [None] * len(jobs)  # None: past the deadline (skipped or stopped)
        groups = self._greedy_groups(jobs)
        with self._lock, torch.inference_mode():
            for group in groups:
                group = [i for i in group if not jobs[i].expired]
                if not group:
                    continue
                outs = self._generate([jobs[i] for i in group], max(jobs[i].max_tokens for i in group))
                for i, out in zip(group, outs):
                    results[i] = None if jobs[i].expired else out[: jobs[i].max_tokens]
            for i, job in enumerate(jobs):
                if not job.greedy and not job.expired:
                    seed = job.seed if job.seed is not None else secrets.randbits(63)
                    torch.manual_seed(seed)  # global RNG: safe, generation is serialized by the lock
                    out = self._generate([job], job.max_tokens, temperature=job.temperature, top_p=job.top_p)[0]
                    results[i] = None if job.expired else out
        return results

    def _greedy_groups(self, jobs: list[Job]) -> list[list[int]]:
        """Indices of greedy jobs split into groups whose padded prompt + longest output fits the context."""
        groups: list[list[int]] = []
        current: list[int] = []
        longest_prompt = most_new = 0
        for i, job in enumerate(jobs):
            if not job.greedy:
                continue
            lp = max(longest_prompt, len(job.prompt_ids))
            mn = max(most_new, job.max_tokens)
            if current and self.context is not None and lp + mn > self.context:
                groups.append(current)
                current, lp, mn = [], len(job.prompt_ids), job.max_tokens
            current.append(i)
            longest_prompt, most_new = lp, mn
        if current:
            groups.append(current)
        return groups

    def _generate(self, jobs: list[Job], max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0) -> list[list[int]]:
        """Left-pad the jobs' prompts and run one ``generate``; returns each row's new ids
        (``<= max_new_tokens``; fewer for a row stopped at its job's deadline)."""
        from transformers import GenerationConfig, StoppingCriteriaList

        prompts = [job.prompt_ids for job in jobs]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self._pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=self._eos_id,
                                      pad_token_id=self._pad_id)
        if temperature >= GREEDY_TEMPERATURE_EPS:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        out = self._model.generate(
            input_ids=input_ids.to(self._device),
            attention_mask=attention.to(self._device),
            generation_config=GenerationConfig(**kwargs),
            stopping_criteria=StoppingCriteriaList([PastDeadline([job.deadline for job in jobs])]),
        )
        return [row[width:].tolist() for row in out.cpu()]

    def _next_token(self, state: _StreamState, job: Job) -> int:
        """One forward pass with the KV cache; returns the next token id (greedy or sampled).

        Raises:
            TimeoutError: the job is past its deadline (also while waiting for the model).
        """
        remaining = job.deadline - time.monotonic()
        if remaining <= 0 or not self._lock.acquire(timeout=remaining):
            raise TimeoutError("past the deadline")
        try:
            with torch.inference_mode():
                out = self._model(input_ids=state.next_input.to(self._device), past_key_values=state.past,
                                  use_cache=True)
                state.past = out.past_key_values
                logits = out.logits[0, -1].float().cpu()
                if job.greedy:
                    token = int(torch.argmax(logits))
                else:
                    token = int(torch.multinomial(nucleus_probs(logits, job.temperature, job.top_p), 1,
                                                  generator=state.generator))
                state.next_input = torch.tensor([[token]], dtype=torch.long)
            return token
        finally:
            self._lock.release()


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling probabilities of one row of logits (shape ``[vocab]``): softmax at ``temperature``, then only the
    smallest set of likeliest tokens whose mass reaches ``top_p`` (always at least the likeliest token, also
    for a ``top_p`` below float32's resolution), renormalised by ``torch.multinomial``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return probs


#: Seconds the continuous batching loop may go without finishing a step while it has requests before
#: :meth:`ContinuousBatchingEngine.health` calls it wedged (one step of a 124M model on 2 CPUs takes well
#: under a second; a long prefill chunk a few).
ENGINE_STALL_S = 60.0
#: Tokens per page of the paged KV cache (transformers' ``ContinuousBatchingConfig.page_size``; its default
#: of 256 wastes most of a page on short chats).
KV_PAGE_TOKENS = 32
#: Most tokens one forward pass of the continuous batching loop takes (prefill chunks and decode tokens
#: together; ``max_batch_tokens``). Longer prompts are prefilled over several steps.
MAX_STEP_TOKENS = 512


class _Sampling:
    """Sampling settings of one request for :class:`_PerRequestSampler` (its own seeded generator)."""

    __slots__ = ("temperature", "top_p", "seed", "generator")

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.generator: Optional[torch.Generator] = None


def _per_request_sampler() -> Any:
    """A continuous-batching logits processor that samples each sampled row with the request's own seeded
    generator and leaves greedy rows alone.

    Why it exists: transformers' continuous batching samples the whole batch with one global RNG
    (``torch.multinomial`` in its ``ModelRunner``) and decides greedy vs sampled for the whole manager
    (``do_sample``), so neither a per-request ``seed`` nor a mix of greedy and sampled requests in one batch
    is possible with the library alone. The manager runs with ``do_sample=False`` (argmax); this processor
    turns a sampled row's scores into a one-hot choice (``-inf`` everywhere but the drawn token) so that
    argmax takes the token drawn from the request's own generator at its own temperature and top_p.
    """
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
    )

    class PerRequestSampler(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"zeroplane_sampling": _Sampling}
        ignored_kwargs = ()

        def __init__(self) -> None:
            self._rows: list[Optional[_Sampling]] = []

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.zero_()

        def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
            # The rows of the next forward pass, in the order of its logits (the library builds both from the
            # same list). The settings are Python objects, so they are kept here rather than in the tensor.
            self._rows = [r.state.logit_processor_kwargs.get("zeroplane_sampling") for r in requests_with_new_token]
            return torch.zeros(len(self._rows), dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            for i, sampling in enumerate(self._rows[: scores.size(0)]):
                if sampling is None:
                    continue  # greedy: argmax of the raw scores
                if sampling.generator is None:
                    sampling.generator = torch.Generator(device=scores.device).manual_seed(sampling.seed)
                probs = nucleus_probs(scores[i], sampling.temperature, sampling.top_p)
                token = torch.multinomial(probs, 1, generator=sampling.generator)
                row = torch.full_like(scores[i], float("-inf"))
                row[token] = 0.0
                scores[i] = row
            return scores

    return PerRequestSampler()


class ContinuousBatchingEngine:
    """The ``continuous`` engine (see the module docstring): transformers' ``ContinuousBatchingManager``.

    Settings given to the library (``ContinuousBatchingConfig``): ``max_requests_per_batch`` =
    ``max_batch_size``; a KV cache of ``KV_PAGE_TOKENS``-token pages, enough for ``max_batch_size`` requests
    of the full context (sized here rather than by the library, whose sizing takes a fraction of the free
    device memory — on a CPU host, of the machine's RAM); ``max_batch_tokens`` = ``MAX_STEP_TOKENS``;
    block sharing (prefix caching) on, so the ``n`` choices of a request and repeated prompts reuse the
    prompt's full KV pages; no async double-buffering and no CUDA graphs (the per-request sampler runs
    Python per row, which neither allows).

    Args:
        model: the loaded causal LM (:func:`load_model`).
        eos_id: end-of-sequence id, or None (then only ``max_tokens`` and stop strings end a request).
        max_batch_size: most requests in one forward pass.
        stall_s: see :data:`ENGINE_STALL_S`.
    """

    name = "continuous"

    def __init__(self, model: Any, eos_id: Optional[int], max_batch_size: int,
                 stall_s: float = ENGINE_STALL_S) -> None:
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessorList,
        )

        self.context = context_length(model.config)
        self._eos_id = eos_id
        self._stall_s = stall_s
        pages_per_request = math.ceil((self.context or 2048) / KV_PAGE_TOKENS)
        cb_config = ContinuousBatchingConfig(
            page_size=KV_PAGE_TOKENS,
            num_blocks=max_batch_size * pages_per_request + pages_per_request,
            max_batch_tokens=max(MAX_STEP_TOKENS, max_batch_size),
            max_requests_per_batch=max_batch_size,
            allow_block_sharing=True,
            use_async_batching=False,
            use_cuda_graph=False,
        )
        generation_config = GenerationConfig(
            do_sample=False, eos_token_id=eos_id if eos_id is not None else -1, max_new_tokens=16,
        )
        self._manager = model.init_continuous_batching(generation_config=generation_config,
                                                       continuous_batching_config=cb_config)
        # Before the loop starts (it builds its batch processor from this list): only our sampler.
        processors = ContinuousBatchingLogitsProcessorList(
            LogitsProcessorList([_per_request_sampler()]), drop_unsupported_processors=False,
        )
        # The library counts argument rows only for the processors it converts itself; ours needs one too.
        processors.tensors_required = 1
        self._manager.logit_processor = processors
        self._active = 0
        self._last_step = time.monotonic()

    def warmup(self) -> None:
        """Start the generation loop and run a greedy and a sampled request through it (the first steps of a
        fresh manager build the paged cache and its batch processor), so that no user request pays for it."""
        self._manager.start()
        for sampling in (None, _Sampling(1.0, 0.9, 0)):
            kwargs = {} if sampling is None else {"zeroplane_sampling": sampling}
            rid = self._manager.add_request([0, 1], request_id=f"warmup-{uuid.uuid4().hex}", max_new_tokens=2,
                                            **kwargs)
            if rid is None:
                raise RuntimeError(f"the continuous batching loop refused the warm-up request: {self.health()}")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                out = self._manager.get_result(request_id=rid, timeout=0.5)
                if out is not None and out.is_finished():
                    break
                if not self._manager.is_running():
                    raise RuntimeError(f"the continuous batching loop stopped during warm-up: {self.health()}")
            else:
                raise RuntimeError("the continuous batching warm-up request did not finish in 300 s")

    def health(self) -> Optional[str]:
        """None, or why the engine is wedged: its loop is not running (a fatal error stops it), or it has
        requests and finished no step for over ``stall_s`` seconds."""
        if not self._manager.is_running():
            error = self._manager.background_thread_status.fatal_error
            return f"the continuous batching loop is not running ({error or 'stopped'})"
        idle = time.monotonic() - self._last_step
        if self._active and idle > self._stall_s:
            return (f"the continuous batching loop has {self._active} requests and finished no step for "
                    f"{idle:.0f} s")
        return None

    def shutdown(self) -> None:
        """Stop the generation loop (pending requests fail)."""
        if self._manager.is_running():
            self._manager.stop(block=False, hard_stop=True)

    async def generate(self, job: Job, stream: bool) -> AsyncIterator[list[int]]:
        """New token ids of ``job`` as each step makes them (``stream`` makes no difference: a non-streaming
        request also ends at the step that completes a stop string).

        Raises:
            RuntimeError: the loop is not running, or the library failed the request.
        """
        rid = f"zp-{uuid.uuid4().hex}"
        outputs: asyncio.Queue = asyncio.Queue()

        def delivered(output: Any) -> None:
            self._last_step = time.monotonic()
            outputs.put_nowait(output)

        kwargs = {}
        if not job.greedy:
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            kwargs["zeroplane_sampling"] = _Sampling(job.temperature, job.top_p, seed)
        self._manager.register_result_handler(rid, delivered)
        if self._active == 0:
            self._last_step = time.monotonic()  # idle time is not a stall
        self._active += 1
        finished = False
        try:
            if self._manager.add_request(job.prompt_ids, request_id=rid, max_new_tokens=job.max_tokens,
                                         streaming=True, **kwargs) is None:
                raise RuntimeError(f"the continuous batching engine refused the request: {self.health()}")
            sent = 0
            while not finished:
                output = await outputs.get()
                if output.error is not None:
                    finished = True
                    raise RuntimeError(f"generation failed: {output.error}")
                finished = output.is_finished()
                tokens = list(output.generated_tokens)
                if len(tokens) > sent:
                    yield tokens[sent:]
                    sent = len(tokens)
        finally:
            self._active -= 1
            if not finished:  # closed early (stop string, deadline, client gone): free the slot now
                self._manager.cancel_request(rid)
                with self._manager.output_router._lock:  # the library drops a handler only on a finished output
                    self._manager.output_router.result_handlers.pop(rid, None)


def build_engine(kind: str, model: Any, device: torch.device, tokenizer: Any, max_batch_size: int,
                 batch_wait_timeout_s: float) -> Any:
    """The engine ``kind`` (``serve.engine``: ``continuous`` or ``generate``) for a loaded model.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "continuous":
        return ContinuousBatchingEngine(model, tokenizer.eos_token_id, max_batch_size)
    if kind == "generate":
        return GenerateEngine(model, device, tokenizer.eos_token_id, pad_id(tokenizer), max_batch_size,
                              batch_wait_timeout_s)
    raise ValueError(f"serve engine {kind!r} is not one of: continuous, generate")
