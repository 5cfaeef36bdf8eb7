"""Dynamic batching: concurrent requests share one left-padded `model.generate` call.

One worker task takes requests from a bounded queue: the first one, then whatever else arrives
within a short window (or is already waiting), up to `max_batch`. Requests with different sampling
settings run as separate groups; different `max_tokens` share a group, and a per-row stopping
criterion ends each row at its own limit or end token, so every answer equals the one its request
would get alone (greedy; left padding does not change a row's logits). Generation runs in one
dedicated thread, so the event loop keeps accepting, validating and answering meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from productvlm.errors import UserError
from productvlm.inference.generate import RowStops, generate, stop_ids
from productvlm.inference.inputs import Prepared, batch, prepare, to_model
from productvlm.serving.errors import APIError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token) or "length" (max_tokens)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # when the job asked: each token's, and its top alternatives
    top: list[list[tuple[int, float]]] | None = None


@dataclass
class Job:
    inputs: Prepared
    max_tokens: int
    sampling: Sampling
    future: asyncio.Future
    on_delta: Callable[[str], None] | None = None  # streaming: called from the generation thread
    logprobs: int | None = None  # None: none; 0: each token's log-probability; k: and the top k
    queued_at: float = field(default_factory=time.perf_counter)


class Engine:
    """The model side: turns prompts + images into `Prepared`, and runs a batch of them."""

    def __init__(self, model, processor, num_crops: int, compiled: bool | None = None):
        self.model, self.processor, self.num_crops, self.compiled = model, processor, num_crops, compiled
        self.stops = stop_ids(model, processor)

    def warmup(self, max_batch: int, max_sequence: int, typical_tokens: int = 256) -> str:
        """Compile the decode step before the first request, for the server's limits, in two caches:
        a short one (a one-photo prompt + `typical_tokens`) at every batch bucket up to `max_batch`, so
        that most requests attend over a short cache, and a long one (`max_sequence`: the longest
        prompt + max_tokens, at most LongRoPE's switch) at the largest bucket. From then on nothing
        compiles: a request no warm shape holds takes the dynamic cache. Returns what it did, to say at start."""
        from productvlm.inference.decode import decode_kwargs, decode_shapes, serving_buckets, warmup

        if not decode_kwargs(self.model, self.compiled):
            return "compiled decode: off (dynamic KV cache)"
        short = self.processor.num_image_tokens(1344, 1344, self.num_crops) + 64 + typical_tokens
        buckets = serving_buckets(max_batch)
        kwargs = {"num_crops": self.num_crops, "compiled": self.compiled}
        seconds = warmup(
            self.model, self.processor, batch_sizes=buckets, max_cache_len=min(short, max_sequence), **kwargs
        )
        seconds += warmup(
            self.model, self.processor, batch_sizes=buckets[-1:], max_cache_len=max_sequence, **kwargs
        )
        return (
            f"compiled decode warmed up in {seconds:.0f}s for {decode_shapes(self.model).describe()}; a request "
            "no warm shape holds (a longer prompt + max_tokens) uses the dynamic KV cache: same answers, no compiling"
        )

    def prepare(self, prompt: str, images: list) -> Prepared:
        """Tokenize `prompt` (placeholders <|image_1|>..) with `images`; 400 on placeholder mistakes."""
        try:
            return prepare(self.processor, prompt, images, self.num_crops)
        except UserError as e:
            raise APIError(400, str(e), code="invalid_prompt") from e

    def generate(self, jobs: list[Job]) -> list[Completion]:
        """One left-padded `generate` for jobs with the same sampling settings."""
        inputs = to_model(batch(self.processor, [j.inputs for j in jobs]), self.model)
        sampling = jobs[0].sampling
        kwargs = {}
        if sampling.temperature > 0:
            kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        streams = Streams(jobs, self.processor.tokenizer)
        max_tokens = [j.max_tokens for j in jobs]
        wanted = [j.logprobs for j in jobs if j.logprobs is not None]
        logprobs = max(wanted) if wanted else None
        rows = generate(
            self.model, inputs, max_tokens, self.stops, streams, self.compiled, logprobs, **kwargs
        )
        return [
            Completion(
                text=self.processor.decode(tokens, skip_special_tokens=True),
                prompt_tokens=len(job.inputs.ids),
                completion_tokens=len(tokens),
                finish_reason=finish,
                tokens=tokens,
                logprobs=rows.logprobs[i] if job.logprobs is not None else None,
                top=[t[: job.logprobs] for t in rows.top[i]] if job.logprobs is not None else None,
            )
            for i, (job, tokens, finish) in enumerate(zip(jobs, rows.tokens, rows.finish))
        ]


class Streams:
    """Sends each streaming row its new text as the batch decodes (called by `RowStops` per row step)."""

    def __init__(self, jobs: list[Job], tokenizer):
        self.jobs, self.tokenizer = jobs, tokenizer
        self.sent = [0] * len(jobs)  # characters already streamed

    def __call__(self, rows: RowStops, i: int) -> None:
        if self.jobs[i].on_delta is None:
            return
        text = self.tokenizer.decode(rows.tokens[i], skip_special_tokens=True)
        if text.endswith("\ufffd") and not rows.done[i]:
            return  # half of a multi-byte character: wait for the rest
        if len(text) > self.sent[i]:
            self.jobs[i].on_delta(text[self.sent[i] :])
            self.sent[i] = len(text)


class Batcher:
    """The bounded queue and the single worker that batches its requests."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 8,
        wait_ms: float = 10.0,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.engine, self.max_batch, self.wait_s = engine, max(1, max_batch), wait_ms / 1000
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self.on_batch = on_batch
        self.after_batch: Callable[[], None] | None = None  # on the generation thread (serve: malloc trim)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._task: asyncio.Task | None = None

    async def warmup(self, max_sequence: int, typical_tokens: int) -> str:
        """The engine's decode warm-up, on the thread that will generate (CUDA graph trees are per thread)."""
        loop = asyncio.get_running_loop()
        warm = self.engine.warmup
        return await loop.run_in_executor(self._executor, warm, self.max_batch, max_sequence, typical_tokens)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(
        self,
        inputs: Prepared,
        max_tokens: int,
        sampling: Sampling = Sampling(),
        on_delta: Callable[[str], None] | None = None,
        logprobs: int | None = None,
    ) -> asyncio.Future:
        """Queue a request; its future gets the Completion (with token log-probabilities when `logprobs`
        is not None, and that many top alternatives). 503 when the queue is full."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(Job(inputs, max_tokens, sampling, future, on_delta, logprobs))
        except asyncio.QueueFull:
            raise APIError(
                503,
                f"server busy: {self.queue.maxsize} requests already waiting; retry shortly",
                "queue_full",
            ) from None
        return future

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(jobs) < self.max_batch:
            if not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11 on
                break
        return [j for j in jobs if not j.future.cancelled()]  # clients that went away

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            groups: dict[Sampling, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.sampling, []).append(job)
            for group in groups.values():
                if self.on_batch:
                    self.on_batch(len(group))
                try:
                    results = await loop.run_in_executor(self._executor, self.engine.generate, group)
                except Exception as e:  # noqa: BLE001  (a failed batch must not kill the worker)
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                for job, result in zip(group, results):
                    if not job.future.done():
                        job.future.set_result(result)
                if self.after_batch is not None:
                    await loop.run_in_executor(self._executor, self.after_batch)
