"""The engine end to end on real torch compute: prefill KV, disaggregated decode from
byte-copied blocks, continuous batching, EOS, abort, shutdown."""

import ctypes
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from tokentrace.serving.engine import (
    BlockPool,
    ByteTokenizer,
    DecodeRequest,
    Engine,
    ModelConfig,
    TinyLM,
)

TOK = ByteTokenizer()
PROMPTS = [
    TOK.encode("Hello, tokentrace! The quick brown fox jumps."),
    TOK.encode("a"),
    TOK.encode(
        "Disaggregated serving splits prefill and decode across nodes, "
        "and the KV cache crosses the wire between them."
    ),
]
WAIT_S = 60.0


@pytest.fixture(scope="module")
def model() -> TinyLM:
    torch.set_num_threads(1)
    return TinyLM(ModelConfig())


@pytest.fixture
def engine(model: TinyLM) -> Iterator[Engine]:
    eng = Engine(model, BlockPool(model.config, 256))
    eng.start()
    yield eng
    eng.shutdown()


@dataclass
class Collector:
    """Callbacks for one request, recording what the engine thread reports."""

    tokens: list[int] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)  # (step, batch_size)
    prefill: list[int] = field(default_factory=list)  # the steps' prefill tokens
    prefilled: list[tuple[int, int]] = field(default_factory=list)  # on_prefill calls
    reason: str | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    first_token: threading.Event = field(default_factory=threading.Event)

    def on_tokens(
        self, token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
    ) -> None:
        self.tokens.extend(token_ids)
        self.steps.append((step, batch_size))
        self.prefill.append(prefill)
        self.first_token.set()

    def on_prefill(self, started_ns: int, done_ns: int) -> None:
        self.prefilled.append((started_ns, done_ns))

    def on_finish(self, finish_reason: str, error: BaseException | None) -> None:
        assert self.reason is None, "on_finish called twice"
        self.reason, self.error = finish_reason, error
        self.finished.set()

    def wait(self) -> None:
        assert self.finished.wait(WAIT_S), "request did not finish"


def submit(
    engine: Engine,
    request_id: str,
    prompt: list[int],
    block_ids: list[int],
    max_tokens: int,
    **kwargs: object,
) -> Collector:
    col = Collector()
    engine.submit(
        DecodeRequest(
            request_id,
            prompt,
            block_ids,
            max_tokens,
            on_tokens=col.on_tokens,
            on_finish=col.on_finish,
            on_prefill=col.on_prefill,
            **kwargs,
        )
    )
    return col


def reference_forward(model: TinyLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook float64 full causal attention from the model's weights, written
    independently of the model code. Returns (last logits [V], kv [L, 2, T, H, D])."""
    c = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    n, nh, hd, half = len(ids), c.n_heads, c.head_dim, c.head_dim // 2
    inv_freq = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    h = w["tok_emb.weight"][torch.tensor(ids)]
    kv = torch.empty((c.n_layers, 2, n, nh, hd), dtype=torch.float64)
    for layer in range(c.n_layers):
        p = f"layers.{layer}."
        qkv = (rms(h, w[p + "attn_norm.weight"]) @ w[p + "wqkv.weight"].T).view(n, 3, nh, hd)
        q, k, v = rope(qkv[:, 0]), rope(qkv[:, 1]), qkv[:, 2]
        kv[layer, 0], kv[layer, 1] = k, v
        out = torch.empty((n, nh, hd), dtype=torch.float64)
        for t in range(n):
            for head in range(nh):
                scores = k[: t + 1, head] @ q[t, head] / math.sqrt(hd)
                out[t, head] = torch.softmax(scores, dim=0) @ v[: t + 1, head]
        h = h + out.reshape(n, c.d_model) @ w[p + "wo.weight"].T
        mlp_in = rms(h, w[p + "mlp_norm.weight"]) @ w[p + "w_in.weight"].T
        h = h + F.gelu(mlp_in) @ w[p + "w_out.weight"].T
    logits = rms(h[-1], w["final_norm.weight"]) @ w["lm_head.weight"].T
    return logits, kv


def read_blocks(pool: BlockPool, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    c = pool.config
    blocks = pool.tensor[torch.tensor(block_ids)]  # [nb, L, 2, bs, H, D]
    seq = blocks.permute(1, 2, 0, 3, 4, 5).reshape(
        c.n_layers, 2, len(block_ids) * c.block_size, c.n_heads, c.head_dim
    )
    return seq[:, :, :num_tokens]


def copy_blocks_raw(src: BlockPool, src_ids: list[int], dst: BlockPool, dst_ids: list[int]) -> None:
    """What the NIXL transfer does: whole blocks, raw bytes, by address."""
    nbytes = src.block_nbytes
    assert nbytes == dst.block_nbytes
    for s, d in zip(src_ids, dst_ids, strict=True):
        ctypes.memmove(
            dst.tensor.data_ptr() + d * nbytes, src.tensor.data_ptr() + s * nbytes, nbytes
        )


def test_prefill_writes_reference_kv(model: TinyLM) -> None:
    pool = BlockPool(model.config, 16)
    eng = Engine(model, pool)
    pool.allocate(3)  # the prompt's blocks are not simply 0..n
    prompt = PROMPTS[0]
    assert len(prompt) % model.config.block_size != 0  # exercise a partial last block
    res = eng.prefill(prompt)
    assert res.num_tokens == len(prompt)
    assert len(res.block_ids) == eng.kv_blocks_for_prompt(len(prompt)) == 3
    ref_logits, ref_kv = reference_forward(model, prompt)
    torch.testing.assert_close(
        read_blocks(pool, res.block_ids, len(prompt)).double(), ref_kv, rtol=1e-4, atol=1e-4
    )
    assert res.next_token == int(ref_logits.argmax())


def test_prefill_rejects_bad_prompts(engine: Engine) -> None:
    free = engine.pool.num_free
    for bad in ([], [257], [-1]):
        with pytest.raises(ValueError):
            engine.prefill(bad)
    assert engine.pool.num_free == free


def test_disaggregated_decode_equals_aggregated(model: TinyLM) -> None:
    prefill_pool = BlockPool(model.config, 64)
    decode_pool = BlockPool(model.config, 64)
    prefill_engine = Engine(model, prefill_pool)
    decode_engine = Engine(model, decode_pool)
    decode_pool.allocate(5)  # destination ids differ from source ids
    data_ptr = decode_pool.tensor.data_ptr()
    decode_engine.start()
    try:
        for i, prompt in enumerate(PROMPTS):
            expected = prefill_engine.generate(prompt, 24)
            assert len(expected) == 24

            res = prefill_engine.prefill(prompt)
            assert res.next_token == expected[0]
            dst = decode_pool.allocate(len(res.block_ids))
            copy_blocks_raw(prefill_pool, res.block_ids, decode_pool, dst)
            prefill_pool.free(res.block_ids)
            # Decode must not need the KV of the last prompt token: it recomputes it.
            last = len(prompt) - 1
            bs = model.config.block_size
            decode_pool.tensor[dst[last // bs], :, :, last % bs] = 0.0

            col = submit(decode_engine, f"r{i}", prompt, dst, 24, ignore_eos=True)
            col.wait()
            assert (col.reason, col.error) == ("length", None)
            assert col.tokens == expected
        prefill_engine.shutdown()
        assert prefill_pool.num_free == 64
        assert decode_pool.num_free == 64 - 5
        assert decode_pool.tensor.data_ptr() == data_ptr
    finally:
        decode_engine.shutdown()


def test_continuous_batching_matches_requests_run_alone(engine: Engine) -> None:
    prompts = [TOK.encode(f"request {i}: " + "xyz" * i) for i in range(6)]
    max_tokens = [5, 30, 12, 40, 8, 20]
    alone = [engine.generate(p, m) for p, m in zip(prompts, max_tokens, strict=True)]
    total_free = engine.pool.num_free

    cols = []
    for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        res = engine.prefill(p)
        cols.append(submit(engine, f"req-{i}", p, res.block_ids, m, ignore_eos=True))
        time.sleep(0.005 * (i % 3))
    for col in cols:
        col.wait()
    for i, col in enumerate(cols):
        assert (col.reason, col.error) == ("length", None)
        assert col.tokens == alone[i], f"request {i}"
        steps = [s for s, _ in col.steps]
        assert steps == sorted(set(steps))  # one token per step, steps increase
    assert max(b for col in cols for _, b in col.steps) > 1
    # batch_size is the same for everyone in a step
    by_step: dict[int, set[int]] = {}
    for col in cols:
        for s, b in col.steps:
            by_step.setdefault(s, set()).add(b)
    assert all(len(v) == 1 for v in by_step.values())
    assert engine.pool.num_free == total_free == engine.pool.num_blocks


def test_prefill_in_step_shares_the_step_with_running_decodes(engine: Engine) -> None:
    """A prompt submitted while another request decodes is prefilled inside a step of
    that request's, which reports the prompt's tokens; every other step reports 0. Both
    outputs equal the prefill-then-decode path's (and so the disaggregated pair's)."""
    long_prompt, short_prompt = PROMPTS[0], PROMPTS[2]
    alone = [engine.generate(long_prompt, 30), engine.generate(short_prompt, 10)]
    second = Collector()

    class First(Collector):
        def on_tokens(
            self, token_ids: list[int], step: int, batch_size: int, p: int, finish: str | None
        ) -> None:
            if not self.tokens:  # the next step must find the second request waiting
                engine.submit(
                    DecodeRequest(
                        "second",
                        short_prompt,
                        [],
                        10,
                        ignore_eos=True,
                        prefill_in_step=True,
                        on_tokens=second.on_tokens,
                        on_finish=second.on_finish,
                        on_prefill=second.on_prefill,
                    )
                )
            super().on_tokens(token_ids, step, batch_size, p, finish)

    first = First()
    engine.submit(
        DecodeRequest(
            "first",
            long_prompt,
            [],
            30,
            ignore_eos=True,
            prefill_in_step=True,
            on_tokens=first.on_tokens,
            on_finish=first.on_finish,
            on_prefill=first.on_prefill,
        )
    )
    first.wait()
    second.wait()
    assert (first.tokens, second.tokens) == (alone[0], alone[1])
    assert first.prefill == [len(long_prompt), len(short_prompt)] + [0] * 28
    assert second.prefill == [len(short_prompt)] + [0] * 9
    assert first.steps[1] == second.steps[0] == (first.steps[0][0] + 1, 2)
    for col in (first, second):
        assert len(col.prefilled) == 1 and col.prefilled[0][0] <= col.prefilled[0][1]
    assert engine.pool.num_free == engine.pool.num_blocks


def test_prefill_budget_spreads_prompts_over_steps(model: TinyLM) -> None:
    """Two prompts waiting together but over the step's prefill budget are prefilled in
    two steps; the second rides on the first's first decode step."""
    eng = Engine(model, BlockPool(model.config, 64), max_prefill_tokens_per_step=1)
    a = submit(eng, "a", PROMPTS[0], [], 3, ignore_eos=True, prefill_in_step=True)
    b = submit(eng, "b", PROMPTS[1], [], 3, ignore_eos=True, prefill_in_step=True)
    eng.start()
    try:
        a.wait()
        b.wait()
    finally:
        eng.shutdown()
    assert a.prefill == [len(PROMPTS[0]), len(PROMPTS[1]), 0]
    assert [s for s, _ in a.steps][1] == b.steps[0][0]
    assert b.prefill == [len(PROMPTS[1]), 0, 0]
    with pytest.raises(ValueError, match="max_prefill_tokens_per_step"):
        Engine(model, BlockPool(model.config, 4), max_prefill_tokens_per_step=0)


def test_eos_stops_unless_ignored(model: TinyLM) -> None:
    pool = BlockPool(model.config, 64)
    plain = Engine(model, pool)
    assert plain.eos_id == TOK.eos_id
    out = plain.generate(PROMPTS[0], 30, ignore_eos=False)
    plain.shutdown()
    # Random weights never pick id 256, so declare a token we know comes out as EOS.
    eos = out[6]
    first = out.index(eos)
    eng = Engine(model, pool, eos_id=eos)
    eng.start()
    try:
        # ignore_eos masks EOS: the request runs to max_tokens and never emits it.
        ignoring = eng.generate(PROMPTS[0], 30, ignore_eos=True)
        assert len(ignoring) == 30 and eos not in ignoring
        assert ignoring[:first] == out[:first]
        res = eng.prefill(PROMPTS[0])
        col = submit(eng, "eos", PROMPTS[0], res.block_ids, 30)
        col.wait()
        assert (col.reason, col.error) == ("stop", None)
        assert col.tokens == out[: first + 1]
        assert pool.num_free == 64
    finally:
        eng.shutdown()


def test_abort_running_and_waiting_requests(model: TinyLM) -> None:
    pool = BlockPool(model.config, 256)
    eng = Engine(model, pool)
    res = eng.prefill(PROMPTS[1])
    waiting = submit(eng, "waiting", PROMPTS[1], res.block_ids, 10)
    eng.abort("waiting")  # before the loop ever ran
    eng.abort("unknown")  # no-op
    eng.start()
    try:
        waiting.wait()
        assert (waiting.reason, waiting.error, waiting.tokens) == ("abort", None, [])

        res = eng.prefill(PROMPTS[0])
        running = submit(eng, "running", PROMPTS[0], res.block_ids, 2000, ignore_eos=True)
        assert running.first_token.wait(WAIT_S)
        eng.abort("running")
        running.wait()
        assert (running.reason, running.error) == ("abort", None)
        assert 0 < len(running.tokens) < 2000
        assert pool.num_free == 256
        # The id is free again once finished.
        res = eng.prefill(PROMPTS[0])
        again = submit(eng, "running", PROMPTS[0], res.block_ids, 3)
        again.wait()
        assert again.reason == "length" and len(again.tokens) == 3
    finally:
        eng.shutdown()


def test_shutdown_aborts_outstanding_and_is_idempotent(model: TinyLM) -> None:
    pool = BlockPool(model.config, 256)
    eng = Engine(model, pool)
    eng.shutdown()  # safe without start
    eng = Engine(model, pool)
    eng.start()
    eng.start()
    res = eng.prefill(PROMPTS[0])
    col = submit(eng, "long", PROMPTS[0], res.block_ids, 2000, ignore_eos=True)
    assert col.first_token.wait(WAIT_S)
    eng.shutdown()
    eng.shutdown()
    assert col.finished.is_set() and col.reason == "abort"
    assert pool.num_free == 256
    res = eng.prefill(PROMPTS[0])  # prefill does not need the loop
    with pytest.raises(RuntimeError):
        eng.submit(DecodeRequest("late", PROMPTS[0], res.block_ids, 4))
    with pytest.raises(RuntimeError):
        eng.start()
    pool.free(res.block_ids)


def test_failing_callback_fails_only_its_request(engine: Engine) -> None:
    boom = RuntimeError("callback bug")
    bad_finish: list[tuple[str, BaseException | None]] = []
    done = threading.Event()

    def on_tokens(
        token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
    ) -> None:
        raise boom

    def on_finish(reason: str, error: BaseException | None) -> None:
        bad_finish.append((reason, error))
        done.set()

    good_res = engine.prefill(PROMPTS[0])
    good = submit(engine, "good", PROMPTS[0], good_res.block_ids, 20, ignore_eos=True)
    bad_res = engine.prefill(PROMPTS[2])
    engine.submit(
        DecodeRequest(
            "bad", PROMPTS[2], bad_res.block_ids, 20, on_tokens=on_tokens, on_finish=on_finish
        )
    )
    assert done.wait(WAIT_S)
    good.wait()
    assert bad_finish == [("error", boom)]
    assert (good.reason, len(good.tokens)) == ("length", 20)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_submit_validation(engine: Engine) -> None:
    res = engine.prefill(PROMPTS[0])
    ok = res.block_ids
    cases = [
        DecodeRequest("a", PROMPTS[0], ok[:1], 4),  # too few blocks for the prompt
        DecodeRequest("a", [], ok, 4),
        DecodeRequest("a", PROMPTS[0], ok, 0),
        DecodeRequest("a", PROMPTS[0], ok, 5000),  # beyond max_seq_len
        DecodeRequest("a", PROMPTS[0], ok, 4, temperature=-1.0),
        DecodeRequest("", PROMPTS[0], ok, 4),
        DecodeRequest("a", PROMPTS[0], [ok[0], ok[0], ok[1]], 4),
        DecodeRequest("a", PROMPTS[0], ok, 4, prefill_in_step=True),  # brings blocks
    ]
    for req in cases:
        with pytest.raises(ValueError):
            engine.submit(req)
    col = submit(engine, "dup", PROMPTS[0], ok, 200, ignore_eos=True)
    with pytest.raises(ValueError, match="already active"):
        engine.submit(DecodeRequest("dup", PROMPTS[0], ok, 4))
    engine.abort("dup")
    col.wait()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_sampling_is_reproducible_per_seed(engine: Engine) -> None:
    a = engine.generate(PROMPTS[0], 32, temperature=1.0, seed=123)
    b = engine.generate(PROMPTS[0], 32, temperature=1.0, seed=123)
    c = engine.generate(PROMPTS[0], 32, temperature=1.0, seed=124)
    assert a == b
    assert a != c


def test_request_waits_for_blocks_instead_of_failing(model: TinyLM) -> None:
    pool = BlockPool(model.config, 8)
    eng = Engine(model, pool)
    long_prompt = PROMPTS[0]  # 3 blocks, grows to 7 with 60 tokens
    alone_long = eng.generate(long_prompt, 60)
    alone_short = eng.generate(PROMPTS[1], 40)
    try:
        a = eng.prefill(long_prompt)
        b = eng.prefill(PROMPTS[1])
        col_a = submit(eng, "a", long_prompt, a.block_ids, 60, ignore_eos=True)
        col_b = submit(eng, "b", PROMPTS[1], b.block_ids, 40, ignore_eos=True)
        col_a.wait()
        col_b.wait()
        assert (col_a.reason, col_b.reason) == ("length", "length")
        assert (col_a.tokens, col_b.tokens) == (alone_long, alone_short)
        # b could not be guaranteed its 3 blocks while a was running, so it waited.
        assert max(s for s, _ in col_a.steps) < min(s for s, _ in col_b.steps)
        assert pool.num_free == 8
    finally:
        eng.shutdown()
