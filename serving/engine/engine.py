"""The reference inference engine: blocking prefill and a continuous-batching decode loop.

Prefill computes the KV of a whole prompt in one causal forward pass into freshly
allocated blocks. Decode takes blocks that hold the KV of prompt positions
``0 .. len-2`` — written by a local prefill, or copied in from another node's pool —
and, like vLLM's disaggregated decode, first recomputes the *last* prompt token at
position ``len-1`` against that cache; that step yields the first output token. From
then on every engine step is one batched forward pass over all running requests, each
contributing one token at its own position. Requests join and leave between steps.

A request submitted with ``prefill_in_step`` (a worker doing both prefill and decode)
brings no blocks: the decode loop prefills its prompt inside an engine step, together
with that step's decode batch, which the request then joins at once — as vLLM's
scheduler mixes prefill chunks into decode steps, and what the seed article calls
piggy-backed prefill. Every request decoding in that step waits for the prefill too: that cost is
what ``on_tokens`` reports as the step's ``prefill_tokens``. Prompts are prefilled
whole (not chunked), in the same forward pass ``prefill`` runs, so the KV and the greedy
output are those of the disaggregated path. On this CPU engine the prefill pass and the
decode pass of a step run back to back under one hold of the compute lock; a GPU engine
fuses them into one launch, but either way the step lasts as long as both.

Threading: ``prefill`` runs on the caller's thread; the decode loop on its own thread.
Both take one engine-wide compute lock, so they never run concurrently on the model.
``torch.set_num_threads`` is left to the caller.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field

import torch

from .kv_cache import BlockPool, OutOfBlocksError
from .model import TinyLM

__all__ = [
    "FINISH_ABORT",
    "FINISH_ERROR",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "DecodeRequest",
    "Engine",
    "PrefillResult",
]

_log = logging.getLogger(__name__)

# Finish reasons, named as in the OpenAI API / vLLM where one exists.
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_STOP = "stop"  # EOS sampled (never with ignore_eos, which masks EOS)
FINISH_ABORT = "abort"  # abort() or engine shutdown
FINISH_ERROR = "error"  # the step failed; on_finish gets the exception


def _ignore_tokens(
    token_ids: list[int], step: int, batch_size: int, prefill_tokens: int, finish: str | None
) -> None:
    pass


def _ignore_prefill(started_ns: int, done_ns: int) -> None:
    pass


def _ignore_finish(finish_reason: str, error: BaseException | None) -> None:
    pass


@dataclass(frozen=True)
class PrefillResult:
    """KV of all ``num_tokens`` prompt tokens in ``block_ids`` (owned by the caller, who
    must free them or hand them to ``Engine.submit``), and the greedy next token."""

    block_ids: list[int]
    next_token: int
    num_tokens: int


@dataclass
class DecodeRequest:
    """One request for the decode loop.

    ``block_ids`` must hold the KV of prompt positions ``0 .. len(prompt_ids)-2`` in
    order (at least ``ceil((len-1) / block_size)`` blocks; ``Engine.kv_blocks_for_prompt``
    is what prefill allocates). On a successful ``submit`` the engine owns them and
    frees them when the request finishes; it allocates more as generation grows. With
    ``prefill_in_step`` the request brings no blocks (``block_ids`` empty): the decode
    loop prefills the prompt in a step shared with running decodes, and calls
    ``on_prefill(started_ns, done_ns)`` (``time.monotonic_ns()``) around that compute.

    Callbacks run on the engine thread between steps: keep them cheap, non-blocking and
    thread-safe. ``on_tokens(token_ids, step, batch_size, prefill_tokens, finish)``: the
    tokens emitted for this request in engine step ``step`` (a counter over the engine's
    forward passes, from 0) that ran ``batch_size`` requests and also prefilled
    ``prefill_tokens`` prompt tokens of ``prefill_in_step`` requests (0 for a step
    without such prefill work; a request's recompute of its last prompt token is one of
    the batch's rows and not counted); an EOS that stops the request is delivered too.
    ``finish`` is the reason this step finished the request (``length`` or ``stop``),
    else None: a server puts it on this step's own chunk, as vLLM does.
    ``on_finish(finish_reason, error)`` is called exactly once, after the request's
    blocks were freed; ``finish_reason`` is one of ``length | stop | abort | error``.
    ``temperature`` 0 is greedy; above 0 samples from softmax(logits / temperature)
    with a per-request generator seeded from ``seed`` (random if None).
    """

    request_id: str
    prompt_ids: Sequence[int]
    block_ids: Sequence[int]
    max_tokens: int
    _: KW_ONLY
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int | None = None
    prefill_in_step: bool = False
    on_tokens: Callable[[list[int], int, int, int, str | None], None] = _ignore_tokens
    on_finish: Callable[[str, BaseException | None], None] = _ignore_finish
    on_prefill: Callable[[int, int], None] = _ignore_prefill


@dataclass
class _Seq:
    """Loop-thread state of one decode request."""

    req: DecodeRequest
    block_ids: list[int]
    final_blocks: int  # blocks needed if it runs to max_tokens
    pos: int  # position of next_input, = number of valid cached positions
    next_input: int
    generator: torch.Generator | None
    num_generated: int = 0
    needs_prefill: bool = False  # prefill_in_step, not yet prefilled
    done: bool = field(default=False)


class Engine:
    """Prefill and continuous-batching decode over one model and one block pool.

    ``max_batch_size`` caps running requests per step; more wait FIFO. A waiting request
    is admitted when the pool's free blocks cover its growth to ``max_tokens`` on top of
    the growth still owed to running requests (or when nothing runs). A step prefills
    admitted ``prefill_in_step`` prompts in admission order while their tokens fit in
    ``max_prefill_tokens_per_step`` (always at least one); the rest wait for the next
    step. Blocks are still allocated lazily; if another pool user took them meanwhile,
    the request that cannot grow fails with ``OutOfBlocksError`` (finish reason
    ``error``). ``eos_id`` defaults to the last vocabulary id, which is
    ``ByteTokenizer.eos_id`` for the default config.
    """

    def __init__(
        self,
        model: TinyLM,
        pool: BlockPool,
        *,
        max_batch_size: int = 64,
        max_prefill_tokens_per_step: int = 512,
        eos_id: int | None = None,
    ) -> None:
        mc, pc = model.config, pool.config
        kv_shape = (mc.n_layers, mc.n_heads, mc.head_dim, mc.block_size, mc.dtype)
        if kv_shape != (pc.n_layers, pc.n_heads, pc.head_dim, pc.block_size, pc.dtype):
            raise ValueError(f"pool config {pc} does not match model config {mc}")
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size!r}")
        if max_prefill_tokens_per_step <= 0:
            raise ValueError(
                f"max_prefill_tokens_per_step must be positive, got {max_prefill_tokens_per_step!r}"
            )
        self._max_prefill_tokens = max_prefill_tokens_per_step
        self._model = model
        self._pool = pool
        self._config = mc
        self._max_batch_size = max_batch_size
        # The last id is EOS by convention (ByteTokenizer: 256 of 257).
        self._eos_id = mc.vocab_size - 1 if eos_id is None else eos_id
        self._compute_lock = threading.Lock()
        self._cv = threading.Condition()
        # Shared with submitters, under _cv:
        self._incoming: deque[DecodeRequest] = deque()
        self._abort_ids: set[str] = set()
        self._active_ids: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Loop-thread only (and shutdown, after the loop has exited):
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._step_count = 0
        self._scratch = torch.empty(0, dtype=pool.tensor.dtype)  # gathered K/V, reused

    # ---- introspection -------------------------------------------------------------

    @property
    def model(self) -> TinyLM:
        return self._model

    @property
    def pool(self) -> BlockPool:
        return self._pool

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._incoming)

    @property
    def step_count(self) -> int:
        """Decode steps (batched forward passes) run so far."""
        return self._step_count

    def kv_blocks_for_prompt(self, num_prompt_tokens: int) -> int:
        """Blocks ``prefill`` allocates for a prompt of this length."""
        return self._pool.blocks_for(num_prompt_tokens)

    # ---- prefill -------------------------------------------------------------------

    def prefill(self, prompt_ids: Sequence[int]) -> PrefillResult:
        """Compute the KV of every prompt token into newly allocated blocks.

        Blocking (runs on the caller's thread, serialized with decode steps). Raises
        ``ValueError`` for a bad prompt and ``OutOfBlocksError`` if the pool is full;
        on any failure no blocks stay allocated.
        """
        ids = self._check_prompt(prompt_ids)
        if len(ids) > self._config.max_seq_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens exceeds max_seq_len={self._config.max_seq_len}"
            )
        n = len(ids)
        block_ids = self._pool.allocate(self._pool.blocks_for(n))
        try:
            with self._compute_lock, torch.inference_mode():
                next_token = self._prefill_into(ids, block_ids)
        except BaseException:
            self._pool.free(block_ids)
            raise
        return PrefillResult(block_ids=block_ids, next_token=next_token, num_tokens=n)

    def _prefill_into(self, ids: list[int], block_ids: list[int]) -> int:
        """The prompt's KV into ``block_ids``; the greedy next token. Hold the compute lock
        and inference mode. The one prefill computation, local or for a remote decode,
        so both paths cache bit-identical KV."""
        c, n, num_blocks = self._config, len(ids), len(block_ids)
        logits, kv = self._model(torch.tensor(ids, dtype=torch.long))
        padded = kv.new_zeros((c.n_layers, 2, num_blocks * c.block_size, c.n_heads, c.head_dim))
        padded[:, :, :n] = kv
        blocks = padded.view(
            c.n_layers, 2, num_blocks, c.block_size, c.n_heads, c.head_dim
        ).permute(2, 0, 1, 3, 4, 5)
        self._pool.tensor.index_copy_(0, torch.tensor(block_ids), blocks)
        return int(logits.argmax())

    # ---- decode loop ---------------------------------------------------------------

    def start(self) -> None:
        """Start the decode thread. Idempotent; raises ``RuntimeError`` after shutdown."""
        with self._cv:
            if self._stopping:
                raise RuntimeError("engine is shut down")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._loop, name="tokentrace-engine-decode", daemon=True
            )
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the decode thread after its current step; every unfinished request gets
        ``on_finish("abort", None)``. Idempotent, safe without ``start``; blocks until the
        thread has exited."""
        with self._cv:
            already = self._stopping
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if already:
            return
        with self._cv:
            incoming = list(self._incoming)
            self._incoming.clear()
        for req in incoming:
            self._waiting.append(self._new_seq(req))
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, FINISH_ABORT, None)
        self._running.clear()
        self._waiting.clear()

    def submit(self, req: DecodeRequest) -> None:
        """Queue a request for decoding; returns immediately.

        Raises ``ValueError`` for a bad request (the caller then still owns its blocks)
        and ``RuntimeError`` after shutdown. Requests submitted before ``start`` wait.
        """
        ids = self._check_prompt(req.prompt_ids)
        c, pool = self._config, self._pool
        if not isinstance(req.request_id, str) or not req.request_id:
            raise ValueError(f"request_id must be a non-empty str, got {req.request_id!r}")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {req.max_tokens!r}")
        total_tokens = len(ids) + req.max_tokens - 1  # positions whose KV gets cached
        if total_tokens > c.max_seq_len:
            raise ValueError(
                f"prompt of {len(ids)} + max_tokens {req.max_tokens} exceeds "
                f"max_seq_len={c.max_seq_len}"
            )
        if pool.blocks_for(total_tokens) > pool.num_blocks:
            raise ValueError(
                f"request needs {pool.blocks_for(total_tokens)} blocks, pool has {pool.num_blocks}"
            )
        blocks = list(req.block_ids)
        if req.prefill_in_step and blocks:
            raise ValueError(
                f"a prefill_in_step request brings no blocks (the engine allocates them), "
                f"got {len(blocks)}"
            )
        if not req.prefill_in_step and len(blocks) < pool.blocks_for(len(ids) - 1):
            raise ValueError(
                f"{len(blocks)} blocks cannot hold the KV of {len(ids) - 1} prompt tokens"
            )
        if len(set(blocks)) != len(blocks) or any(not 0 <= b < pool.num_blocks for b in blocks):
            raise ValueError(f"bad block ids {blocks}")
        t = req.temperature
        if not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {t!r}")
        with self._cv:
            if self._stopping:
                raise RuntimeError("engine is shut down")
            if req.request_id in self._active_ids:
                raise ValueError(f"request_id {req.request_id!r} is already active")
            self._active_ids.add(req.request_id)
            self._incoming.append(req)
            self._cv.notify_all()

    def abort(self, request_id: str) -> None:
        """Stop a request before the next step: its blocks are freed and it gets
        ``on_finish("abort", None)``. No-op for an unknown or finished request."""
        with self._cv:
            if request_id in self._active_ids:
                self._abort_ids.add(request_id)
                self._cv.notify_all()

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        ignore_eos: bool = True,
        *,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[int]:
        """Prefill then decode through the same machinery as the disaggregated path;
        returns the output tokens (an EOS that stopped generation included).

        Blocking; starts the decode loop if needed. Raises what the request failed with,
        or ``RuntimeError`` if it was aborted.
        """
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        self.start()
        result = self.prefill(prompt_ids)
        out: list[int] = []
        finished = threading.Event()
        outcome: list[tuple[str, BaseException | None]] = []

        def on_tokens(
            token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
        ) -> None:
            out.extend(token_ids)

        def on_finish(reason: str, error: BaseException | None) -> None:
            outcome.append((reason, error))
            finished.set()

        req = DecodeRequest(
            f"generate-{uuid.uuid4().hex}",
            list(prompt_ids),
            result.block_ids,
            max_tokens,
            ignore_eos=ignore_eos,
            temperature=temperature,
            seed=seed,
            on_tokens=on_tokens,
            on_finish=on_finish,
        )
        try:
            self.submit(req)
        except BaseException:
            self._pool.free(result.block_ids)
            raise
        finished.wait()
        reason, error = outcome[0]
        if error is not None:
            raise error
        if reason == FINISH_ABORT:
            raise RuntimeError(f"request {req.request_id} aborted after {len(out)} tokens")
        return out

    # ---- internals -----------------------------------------------------------------

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("prompt must have at least one token")
        vocab = self._config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids outside [0, {vocab}): {bad[:8]}")
        return ids

    def _new_seq(self, req: DecodeRequest) -> _Seq:
        generator = None
        if req.temperature > 0:
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            generator = torch.Generator().manual_seed(seed)
        n = len(req.prompt_ids)
        return _Seq(
            req=req,
            block_ids=list(req.block_ids),
            final_blocks=self._pool.blocks_for(n + req.max_tokens - 1),
            pos=n - 1,
            next_input=int(req.prompt_ids[-1]),
            generator=generator,
            needs_prefill=req.prefill_in_step,
        )

    def _finish(self, seq: _Seq, reason: str, error: BaseException | None) -> None:
        if seq.done:
            return
        seq.done = True
        try:
            self._pool.free(seq.block_ids)
        except Exception:
            _log.exception("freeing blocks of request %s", seq.req.request_id)
        seq.block_ids = []
        with self._cv:
            self._active_ids.discard(seq.req.request_id)
            self._abort_ids.discard(seq.req.request_id)
        try:
            seq.req.on_finish(reason, error)
        except Exception:
            _log.exception("on_finish of request %s raised", seq.req.request_id)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (
                    self._stopping
                    or self._incoming
                    or self._abort_ids
                    or self._waiting
                    or self._running
                ):
                    self._cv.wait()
                if self._stopping:
                    return
                incoming = list(self._incoming)
                self._incoming.clear()
                aborts = set(self._abort_ids)
                self._abort_ids.clear()
            try:
                for req in incoming:
                    self._waiting.append(self._new_seq(req))
                if aborts:
                    self._abort(aborts)
                self._admit()
                if self._running:
                    with torch.inference_mode():
                        self._step()
            except Exception as exc:  # a bug in the loop itself: fail everyone, keep going
                _log.exception("decode loop iteration failed")
                for seq in [*self._running, *self._waiting]:
                    self._finish(seq, FINISH_ERROR, exc)
                self._running.clear()
                self._waiting.clear()

    def _abort(self, ids: set[str]) -> None:
        for queue in (self._running, self._waiting):
            for seq in [s for s in queue if s.req.request_id in ids]:
                queue.remove(seq)
                self._finish(seq, FINISH_ABORT, None)

    def _admit(self) -> None:
        owed = sum(s.final_blocks - len(s.block_ids) for s in self._running)
        while self._waiting and len(self._running) < self._max_batch_size:
            seq = self._waiting[0]
            extra = max(0, seq.final_blocks - len(seq.block_ids))
            if self._running and self._pool.num_free - owed < extra:
                break
            self._waiting.popleft()
            self._running.append(seq)
            owed += extra

    def _prefills_for_step(self) -> list[_Seq]:
        """Admitted prompts to prefill in this step, in admission order, within the
        step's prefill token budget (the first always fits)."""
        chosen: list[_Seq] = []
        tokens = 0
        for seq in self._running:
            if not seq.needs_prefill:
                continue
            n = len(seq.req.prompt_ids)
            if chosen and tokens + n > self._max_prefill_tokens:
                break
            chosen.append(seq)
            tokens += n
        return chosen

    def _prefill_in_step(self, seq: _Seq) -> bool:
        """Prefill one prompt inside the step (compute lock held); on failure the request
        is finished with the error. True when it joins this step's decode batch."""
        ids = [int(i) for i in seq.req.prompt_ids]
        started = time.monotonic_ns()
        try:
            seq.block_ids = self._pool.allocate(self._pool.blocks_for(len(ids)))
            self._prefill_into(ids, seq.block_ids)
        except Exception as exc:
            if not isinstance(exc, OutOfBlocksError):
                _log.exception("prefill of request %s failed", seq.req.request_id)
            self._running.remove(seq)
            self._finish(seq, FINISH_ERROR, exc)
            return False
        seq.needs_prefill = False
        try:
            seq.req.on_prefill(started, time.monotonic_ns())
        except Exception:
            _log.exception("on_prefill of request %s raised", seq.req.request_id)
        return True

    def _step(self) -> None:
        bs = self._config.block_size
        for seq in list(self._running):
            missing = seq.pos // bs + 1 - len(seq.block_ids)
            if missing > 0 and not seq.needs_prefill:
                try:
                    seq.block_ids.extend(self._pool.allocate(missing))
                except OutOfBlocksError as exc:
                    self._running.remove(seq)
                    self._finish(seq, FINISH_ERROR, exc)
        prefills = self._prefills_for_step()
        with self._compute_lock:
            # The step's prefill work first: the prompts' KV must be cached before their
            # last tokens are recomputed in the decode batch below.
            prefill_tokens = sum(
                len(seq.req.prompt_ids) for seq in prefills if self._prefill_in_step(seq)
            )
            batch = [s for s in self._running if not s.needs_prefill]
            if not batch:
                return
            try:
                logits = self._forward(batch)
            except Exception as exc:
                _log.exception("decode step failed for %d requests", len(batch))
                for seq in batch:
                    self._running.remove(seq)
                    self._finish(seq, FINISH_ERROR, exc)
                return
        step = self._step_count
        self._step_count += 1
        # ignore_eos masks EOS (as vLLM's min_tokens does) so that every emission of such
        # a request is a visible token: the byte tokenizer decodes EOS to nothing.
        masked = [i for i, s in enumerate(batch) if s.req.ignore_eos]
        if masked:
            logits[masked, self._eos_id] = float("-inf")
        greedy = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(batch):
            req = seq.req
            try:
                token = (
                    greedy[i]
                    if seq.generator is None
                    else self._sample(logits[i], req.temperature, seq.generator)
                )
                seq.pos += 1
                seq.num_generated += 1
                seq.next_input = token
                if token == self._eos_id and not req.ignore_eos:
                    reason: str | None = FINISH_STOP
                elif seq.num_generated >= req.max_tokens:
                    reason = FINISH_LENGTH
                else:
                    reason = None
                req.on_tokens([token], step, len(batch), prefill_tokens, reason)
            except Exception as exc:
                _log.exception("emitting a token for request %s failed", req.request_id)
                self._running.remove(seq)
                self._finish(seq, FINISH_ERROR, exc)
                continue
            if reason is not None:
                self._running.remove(seq)
                self._finish(seq, reason, None)

    def _forward(self, batch: list[_Seq]) -> torch.Tensor:
        """One batched forward pass; stores the new tokens' KV; returns logits [B, V]."""
        pool = self._pool
        positions = torch.tensor([s.pos for s in batch], dtype=torch.long)
        tokens = torch.tensor([s.next_input for s in batch], dtype=torch.long)
        # Block tables padded (with the sequence's own first block; masked out) to the
        # longest in the batch.
        width = max(pool.blocks_for(s.pos + 1) for s in batch)
        table = torch.tensor(
            [
                s.block_ids[:width] + [s.block_ids[0]] * (width - len(s.block_ids[:width]))
                for s in batch
            ],
            dtype=torch.long,
        )
        c = self._config
        needed = 2 * len(batch) * width * c.block_size * c.n_heads * c.head_dim
        if self._scratch.numel() < needed:
            # Grow geometrically; the buffer is reused by every later step.
            self._scratch = torch.empty(
                max(needed, 2 * self._scratch.numel()), dtype=pool.tensor.dtype
            )
        return self._model.forward_paged(
            tokens, positions, pool.tensor, table, self._scratch
        ).float()

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))
