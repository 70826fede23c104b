"""Dynamic batching for `tunekit serve`: one worker thread owns the model and decodes the rows of
concurrent requests together, token by token, in one loop over a shared KV cache.

Requests that arrive within a short wait window form one batch (prompts padded on the left, so
every row continues at the right end). Each step hands every row its new token, so a streamed
request sees its text as it grows while it shares the forward pass with the others. A row that is
done (EOS, a stop sequence, max_tokens) or whose client went away is dropped from the cache, so
the rest of the batch runs on without it. Each row samples with its own temperature, top-p and
random generator, so a seeded request gives the same text whoever shares its batch."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunekit.upstream import can_join, forward_with_cache, join_caches, trim_cache_left

log = logging.getLogger("tunekit.serving.server")


@dataclass(frozen=True)
class Sampling:
    """How one request's rows choose their tokens and when they end."""

    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh random seed per row


@dataclass(frozen=True)
class Event:
    """What the worker tells a request: new text of one choice, and its end (finish_reason set)."""

    index: int
    text: str
    finish_reason: str | None = None  # "stop" or "length" when the choice is complete
    tokens: int = 0  # generated tokens of this choice (EOS included), set at the end
    error: str | None = None  # the batch failed; the request ends with a server error


class Job:
    """One request: `n` continuations of `prompt_ids`. `emit` is called from the worker thread."""

    def __init__(self, prompt_ids: list[int], n: int, sampling: Sampling, emit: Callable[[Event], None],
                 first_index: int = 0) -> None:
        self.prompt_ids = prompt_ids
        self.n = n
        self.sampling = sampling
        self.emit = emit
        self.first_index = first_index  # choice index of the first row (several prompts in one request)
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client is gone: the worker drops this job's rows at its next step."""
        self.cancelled.set()


@dataclass
class Batch:
    """The rows being decoded, their KV cache and attention mask (both as long as the sequence so
    far), and each row's newest token, the next input."""

    rows: list[Row]
    cache: Any
    mask: Any
    tokens: list[int]


@dataclass
class Row:
    job: Job
    index: int
    generator: Any
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could still become a stop sequence (or complete a
    multi-byte character), and so must not be streamed yet."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the earliest stop sequence begins in `text` (searching from `start`), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def choose_tokens(logits: Any, rows: list[Row]) -> list[int]:
    """Each row's next token: argmax for greedy rows; for the others, sampling from the top-p
    nucleus at the row's temperature with the row's own generator."""
    import torch

    chosen = logits.argmax(-1)
    sampled = [i for i, row in enumerate(rows) if row.job.sampling.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([rows[i].job.sampling.temperature for i in sampled], device=logits.device)
        top_p = torch.tensor([rows[i].job.sampling.top_p for i in sampled], device=logits.device)
        probs = torch.softmax(logits[index].float() / temps[:, None], dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < top_p[:, None])  # the top one always stays
        cdf = sorted_p.cumsum(-1)
        draws = torch.stack([torch.rand((), generator=rows[i].generator, device=logits.device) for i in sampled])
        # A float32 cdf ends a little off its true total (normalised, up to ~2e-7 under 1): the draw
        # is scaled to where the cdf really ends, and the position kept inside the nucleus, so a draw
        # near 1 never falls past it onto the last token of the vocabulary (the least likely one).
        last = (sorted_p > 0).sum(-1, keepdim=True) - 1
        position = torch.minimum((cdf < draws[:, None] * cdf[:, -1:]).sum(-1, keepdim=True), last)
        chosen[index] = order.gather(1, position).squeeze(1)
    return chosen.tolist()


class BatchDecoder:
    """The worker thread and its queue. `submit` is safe from any thread; results come back
    through each job's `emit`."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 64, wait_s: float = 0.01) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.eos_ids = {tokenizer.eos_token_id, *self._config_eos(model)} - {None}
        # batches: groups of jobs prefilled together; joins: groups that joined a running batch
        # width: positions in the running batch's KV cache now; widest: the most it has held
        # steps, step_seconds: forward passes and the time they took (bench/serve_soak.py watches both)
        self.stats = {"batches": 0, "joins": 0, "rows": 0, "rows_cancelled": 0, "rows_failed": 0, "tokens": 0,
                      "largest_batch": 0, "width": 0, "widest": 0, "steps": 0, "step_seconds": 0.0}
        # decoding steps (one new token a row) by their number of rows: how many, and their seconds, so
        # that step times can be compared at the same batch sizes (bench/serve_soak.py)
        self.decode_steps: Counter[int] = Counter()
        self.decode_seconds: defaultdict[int, float] = defaultdict(float)
        self._live: list[Job] = []  # the jobs with rows in the running batch, or being prefilled
        self._queue: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="tunekit-serve-worker", daemon=True)

    @staticmethod
    def _config_eos(model: Any) -> list[int]:
        """A chat model may end its turn on another token than the tokenizer's EOS (the
        generation config lists them), as `generate` knows."""
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        return eos if isinstance(eos, list) else [eos]

    def start(self) -> BatchDecoder:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if job.n > self.max_batch:
            raise ValueError(f"n={job.n} is more than the batch holds ({self.max_batch})")
        with self._ready:
            self._queue.append(job)
            self._ready.notify()

    def _next_batch(self) -> list[Job]:
        """Wait for a job, then for up to `wait_s` more for others to join, up to max_batch rows."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if self._closed:
                return []
            deadline = time.monotonic() + self.wait_s
            batch: list[Job] = []
            rows = 0
            while not self._closed:
                while self._queue and rows + self._queue[0].n <= self.max_batch:
                    job = self._queue.popleft()
                    if self._alive(job):
                        batch.append(job)
                        rows += job.n
                left = deadline - time.monotonic()
                if left <= 0 or rows >= self.max_batch or (self._queue and batch):
                    break
                self._ready.wait(timeout=left)
            return batch

    def _alive(self, job: Job) -> bool:
        """False for a job cancelled while it waited (its client left): its rows never start."""
        if job.cancelled.is_set():
            self.stats["rows_cancelled"] += job.n
            return False
        return True

    def _work(self) -> None:
        while not self._closed:
            jobs = self._next_batch()
            if not jobs:
                continue
            try:
                self._decode(jobs)
            except Exception as err:  # a forward pass failed: the server keeps serving; these requests get a 500
                log.exception("generation failed for a batch of %d requests", len(self._live))
                for job in self._live:
                    self._fail(job, err)
            self._live = []

    def _fail(self, job: Job, err: Exception) -> None:
        """End one request with a server error; its rows leave the batch at the next step."""
        job.cancel()
        self.stats["rows_failed"] += job.n
        for i in range(job.n):
            job.emit(Event(job.first_index + i, "", error=f"{type(err).__name__}: {err}"))

    def _rows(self, jobs: list[Job]) -> list[Row]:
        """Each job's rows with their generators; a job whose rows cannot be set up fails alone."""
        import torch

        rows = []
        for job in jobs:
            try:
                for i in range(job.n):
                    seed = job.sampling.seed + i if job.sampling.seed is not None else random.getrandbits(63)
                    generator = torch.Generator(device=self.model.device).manual_seed(seed)
                    rows.append(Row(job, job.first_index + i, generator))
            except Exception as err:
                log.exception("a request could not start")
                rows = [row for row in rows if row.job is not job]
                self._fail(job, err)
        return rows

    def _decode(self, jobs: list[Job]) -> None:
        """Decode a batch until its last row ends, a forward pass per token. Jobs that arrive
        meanwhile join it between two steps (prefilled on their own, then their cache rows
        appended), so a long generation does not hold up the requests behind it."""
        import torch

        self._live = list(jobs)
        batch = self._prefill(jobs)
        jobs.clear()  # from here on self._live holds the jobs still decoding, and only those
        while batch is not None:
            waiting = self._take(self.max_batch - len(batch.rows)) if can_join(batch.cache) else []
            # Only the jobs still decoding are held (and failed, should a step fail): finished ones
            # and their replies are let go however long the batch runs.
            self._live = list({id(row.job): row.job for row in batch.rows}.values()) + waiting
            newcomers = self._prefill(waiting) if waiting else None
            if newcomers is not None:
                batch = self._join(batch, newcomers)
            ids = torch.tensor([[t] for t in batch.tokens], device=self.model.device)
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=-1)
            batch = self._step(batch.rows, ids, mask, batch.cache)

    def _take(self, room: int) -> list[Job]:
        """The waiting jobs that fit in `room` rows, without waiting."""
        taken: list[Job] = []
        with self._ready:
            while self._queue and self._queue[0].n <= room:
                job = self._queue.popleft()
                if self._alive(job):
                    taken.append(job)
                    room -= job.n
        return taken

    def _prefill(self, jobs: list[Job]) -> Batch | None:
        """The prompts, padded on the left, through the model: the batch after its first token."""
        import torch

        rows = self._rows(jobs)
        if not rows:
            return None
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        width = max(len(row.job.prompt_ids) for row in rows)
        pads = [width - len(row.job.prompt_ids) for row in rows]
        device = self.model.device
        ids = torch.tensor([[self.tokenizer.pad_token_id] * p + r.job.prompt_ids for p, r in zip(pads, rows)], device=device)
        mask = torch.tensor([[0] * p + [1] * (width - p) for p in pads], device=device)
        return self._step(rows, ids, mask, None)

    def _step(self, rows: list[Row], ids: Any, mask: Any, cache: Any) -> Batch | None:
        """One forward pass: every row gets its next token; the rows that end leave the batch."""
        import torch

        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # padding does not count
        started = time.perf_counter()
        with torch.inference_mode():
            logits, cache = forward_with_cache(self.model, cache, input_ids=ids, attention_mask=mask,
                                               position_ids=positions, use_cache=True, logits_to_keep=1)
            tokens = choose_tokens(logits[:, -1, :], rows)
        elapsed = time.perf_counter() - started
        self.stats["steps"] += 1
        self.stats["step_seconds"] += elapsed
        if ids.shape[1] == 1:
            self.decode_steps[len(rows)] += 1
            self.decode_seconds[len(rows)] += elapsed
        keep = [i for i, (row, token) in enumerate(zip(rows, tokens)) if self._advance_or_fail(row, token)]
        if not keep:
            self.stats["width"] = 0
            return None
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        cache, mask = self._trimmed(cache, mask)
        return Batch([rows[i] for i in keep], cache, mask, [tokens[i] for i in keep])

    def _trimmed(self, cache: Any, mask: Any) -> tuple[Any, Any]:
        """Without the columns on the left that are padding in every row: the rows that needed
        them have left, and a batch that requests keep joining would otherwise grow a column per
        step for as long as it runs."""
        if can_join(cache):
            used = mask.any(0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first:
                trim_cache_left(cache, first)
                mask = mask[:, first:]
        self.stats["width"] = mask.shape[1]
        self.stats["widest"] = max(self.stats["widest"], mask.shape[1])
        return cache, mask

    def _join(self, batch: Batch, newcomers: Batch) -> Batch:
        import torch

        self.stats["joins"] += 1
        join_caches(batch.cache, newcomers.cache)
        width = max(batch.mask.shape[1], newcomers.mask.shape[1])
        masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (batch.mask, newcomers.mask)]
        return Batch(batch.rows + newcomers.rows, batch.cache, torch.cat(masks), batch.tokens + newcomers.tokens)

    def _advance_or_fail(self, row: Row, token: int) -> bool:
        """`_advance`, where an error (decoding, a stop sequence) fails only this row's request."""
        try:
            return self._advance(row, token)
        except Exception as err:
            log.exception("a request failed")
            self._fail(row.job, err)
            return False

    def _advance(self, row: Row, token: int) -> bool:
        """Give a row its new token and emit the text that is safe to show; False when it ends."""
        if row.job.cancelled.is_set():
            self.stats["rows_cancelled"] += 1
            return False
        sampling = row.job.sampling
        row.tokens.append(token)
        self.stats["tokens"] += 1
        finish = None
        if token in self.eos_ids:
            text = self.tokenizer.decode(row.tokens[:-1], skip_special_tokens=True)
            finish = "stop"
        else:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = first_stop(text, sampling.stop, max(0, row.sent - max(map(len, sampling.stop), default=0)))
            if cut is not None:
                text = text[:cut]
                finish = "stop"
            elif len(row.tokens) >= sampling.max_tokens:
                finish = "length"
        end = len(text) if finish else len(text) - held_back(text, sampling.stop)
        if end > row.sent or finish:
            row.job.emit(Event(row.index, text[row.sent:end], finish, len(row.tokens) if finish else 0))
            row.sent = max(row.sent, end)
        return finish is None
