"""The prefix-state cache (serving/prefix_cache.py): the trie, its least-recently-used bound
and exact byte accounting on their own; then two in-process servers, one with the cache and
one without (--prefix-cache-mb 0), giving the same text for the same seed and the same Score
figures, with the cache's metrics moving; and the flag and its environment variable on a real
`nlstm serve` process."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.engine import Engine, Limits
from serving.prefix_cache import ENTRY_BYTES, NODE_BYTES, PrefixCache, Recorder
from serving.testing.inprocess import ServerThread
from training.testing.models import CHAR_MODEL

S, H, V = 3, 8, 12  # a small state and vocabulary for the unit tests


def state_of(ids) -> tuple[np.ndarray, np.ndarray]:
    """A (state, logits) that tells which prefix it was stored for."""
    rng = np.random.default_rng(abs(hash(tuple(int(i) for i in ids))) % 2**32)
    return rng.standard_normal((S, H)).astype(np.float32), rng.standard_normal(V).astype(np.float32)


def put(cache: PrefixCache, ids, n: int, model: str = "m"):
    ids = np.asarray(ids, dtype=np.int32)
    return cache.insert(model, ids, n, *state_of(ids[:n]))


def recount(cache: PrefixCache, model: str = "m") -> int:
    """The bytes a model's trie holds, counted from its structure; checks its shape on the way:
    every leaf has an entry, every node without one parts two prompts, depths add up."""
    total = 0
    for node in cache.nodes(model):
        assert not node.dead and len(node.label) >= 1
        assert node.depth == node.parent.depth + len(node.label)
        assert node.parent.children[int(node.label[0])] is node
        assert node.entry is not None or len(node.children) >= 2
        total += NODE_BYTES + node.label.nbytes
        if node.entry is not None:
            total += node.entry[0].nbytes + node.entry[1].nbytes + ENTRY_BYTES
    return total


def one_entry_bytes(n: int) -> int:
    """What a cache holding one entry after n symbols (one node) counts."""
    state, logits = state_of([0])
    return NODE_BYTES + 4 * n + state.nbytes + logits.nbytes + ENTRY_BYTES


# ------------------------------------------------------------------------------- the trie
def test_lookup_finds_the_deepest_cached_prefix():
    cache = PrefixCache(1 << 20)
    cache.add_model("m")
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    assert cache.lookup("m", np.array(a, np.int32)) is None
    put(cache, a, 3)
    put(cache, a, 8)
    put(cache, [1, 2, 9, 9], 4)  # parts from a inside the first edge: the edge splits at 2
    for query, n in (
        ([1, 2, 3], 3),
        ([1, 2, 3, 4, 5], 3),
        (a + [0, 0], 8),
        (a, 8),
        ([1, 2, 9, 9, 1], 4),
        ([1, 2, 9], None),
        ([1, 2], None),
        ([2, 3], None),
        ([1, 2, 3, 4, 5, 6, 7, 0], 3),
    ):
        hit = cache.lookup("m", np.array(query, np.int32))
        if n is None:
            assert hit is None, query
            continue
        got, state, logits = hit
        want = state_of(query[:n])
        assert got == n and np.array_equal(state, want[0]) and np.array_equal(logits, want[1]), (
            query
        )
        assert (
            not state.flags.writeable and not logits.flags.writeable
        )  # calls read them, nobody writes
    assert cache.entries("m") == 3 and cache.bytes == recount(cache)
    cache.add_model("other")  # one trie per model
    assert cache.lookup("other", np.array(a, np.int32)) is None


def test_an_existing_entry_is_kept_and_inserts_copy():
    cache = PrefixCache(1 << 20)
    cache.add_model("m")
    ids = np.array([4, 5, 6], np.int32)
    state, logits = state_of(ids)
    cache.insert("m", ids, 3, state, logits)
    before = cache.bytes
    state[:] = 0  # the caller's arrays (a row of a batch's output) are not the cache's
    cache.insert("m", ids, 3, np.ones((S, H), np.float32), np.ones(V, np.float32))
    _, held, _ = cache.lookup("m", ids)
    assert (
        np.array_equal(held, state_of(ids)[0]) and cache.bytes == before and cache.entries("m") == 1
    )


def test_least_recently_used_entries_go_first_and_the_bound_holds():
    one = one_entry_bytes(4)
    cache = PrefixCache(3 * one)  # three separate 4-symbol prompts fit, a fourth does not
    cache.add_model("m")
    for first in (1, 2, 3):
        put(cache, [first, 0, 0, 0], 4)
    assert cache.bytes == 3 * one == recount(cache)
    assert (
        cache.lookup("m", np.array([1, 0, 0, 0, 7], np.int32))[0] == 4
    )  # 1 is now the most recent
    put(cache, [4, 0, 0, 0], 4)
    kept = {
        first for first in (1, 2, 3, 4) if cache.lookup("m", np.array([first, 0, 0, 0], np.int32))
    }
    assert kept == {1, 3, 4} and cache.evicted == 1  # 2 was the least recently used
    assert cache.bytes == 3 * one == recount(cache) <= cache.max_bytes
    assert cache.model_bytes("m") == cache.bytes and cache.entries("m") == 3


def test_an_entry_larger_than_the_whole_budget_is_not_kept():
    cache = PrefixCache(one_entry_bytes(4) - 1)
    cache.add_model("m")
    assert put(cache, [1, 2, 3, 4], 4) is None
    assert (
        cache.bytes == 0
        and cache.entries("m") == 0
        and cache.lookup("m", np.array([1, 2, 3, 4], np.int32)) is None
    )
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 1"):
        PrefixCache(0)


@pytest.mark.parametrize("budget_entries", [5, 40, 10_000])
def test_random_prompts_keep_exact_accounting_within_the_bound(budget_entries):
    """Prompts of a small alphabet (so that they share openings and part at random places),
    checkpoints every 4 symbols and at the end, evictions merging and pruning nodes: after
    every insert the bytes counted equal the structure's, stay within the bound, and every
    lookup returns the state stored for exactly the prefix it reports."""
    rng = np.random.default_rng(budget_entries)
    cache = PrefixCache(budget_entries * one_entry_bytes(8), every=4)
    cache.add_model("m")
    prompts = [rng.integers(0, 3, rng.integers(1, 30)).astype(np.int32) for _ in range(300)]
    zeros = np.zeros((S, H), np.float32)
    starts = []  # symbols skipped, per prompt
    for ids in prompts:
        # as the engine does: start after the deepest cached prefix, record the rest
        state, logits, rest, recorder = cache.start("m", ids.tolist(), zeros)
        n0 = len(ids) - len(rest)
        starts.append((n0, len(ids)))
        assert rest == ids[n0:].tolist()
        if n0:
            assert np.array_equal(state, state_of(ids[:n0])[0]) and np.array_equal(
                logits, state_of(ids[:n0])[1]
            )
        else:
            assert state is zeros and logits is None
        assert (recorder is None) == (n0 == len(ids))
        for n in range(n0 + 1, len(ids) + 1):
            more = recorder.stepped(*state_of(ids[:n]))
            assert more == (n < len(ids))
            assert cache.bytes == recount(cache) <= cache.max_bytes
    assert cache.model_bytes("m") == cache.bytes
    # prompts started inside (7, 154, 227 of the 300) and after their whole (1, 7, 21)
    assert sum(0 < n0 < n for n0, n in starts) >= 5 and sum(n0 == n for n0, n in starts) >= 1
    if budget_entries < 40:
        assert cache.evicted > 0
    # every entry left is found, with its own state
    for node in cache.nodes("m"):
        if node.entry is not None:
            path, up = [], node
            while up.parent is not None:
                path[:0] = up.label.tolist()
                up = up.parent
            n, state, _ = cache.lookup("m", np.array(path, np.int32))
            assert n == node.depth == len(path) and np.array_equal(state, state_of(path)[0])


def test_a_recorder_keeps_every_kth_prefix_and_the_prompts_end():
    cache = PrefixCache(1 << 20, every=32)
    cache.add_model("m")
    ids = np.arange(100, dtype=np.int32) % 11
    recorder = Recorder(cache, "m", ids, 0)
    for n in range(1, 101):
        recorder.stepped(*state_of(ids[:n]))
    depths = sorted(node.depth for node in cache.nodes("m") if node.entry is not None)
    assert depths == [32, 64, 96, 100]
    # a prompt sharing the first 70 symbols starts from 64; one repeating the whole from 100
    other = np.concatenate([ids[:70], [5, 5, 5]]).astype(np.int32)
    assert cache.lookup("m", other)[0] == 64 and cache.lookup("m", ids)[0] == 100


def test_the_accounting_matches_the_memory_really_used():
    """NODE_BYTES and ENTRY_BYTES estimate the Python objects around the arrays: what the
    cache counts is within 20% of what tracemalloc sees it allocate, for the PTB model's
    state and logits (3 x 600 + 51 floats) and for a tiny model's, where the objects
    dominate."""
    for shape, vocab in (((3, 600), 51), ((2, 16), 30)):
        rng = np.random.default_rng(0)
        cache = PrefixCache(1 << 34)
        cache.add_model("m")
        state, logits = np.ones(shape, np.float32), np.ones(vocab, np.float32)
        prompts = [rng.integers(0, 40, 300).astype(np.int32) for _ in range(100)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for ids in prompts:
                cursor = None
                for n in [*range(32, 300, 32), 300]:
                    cursor = cache.insert("m", ids, n, state, logits, cursor)
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert 0.8 < cache.bytes / used < 1.2, (shape, cache.bytes, used)


def test_concurrent_inserts_and_lookups_keep_the_invariants():
    """Two recorder threads (two models' scheduler threads) and a lookup thread (the event
    loop) on one cache whose bound forces evictions all along."""
    cache = PrefixCache(30 * one_entry_bytes(8), every=4)
    for m in ("a", "b"):
        cache.add_model(m)
    errors: list[Exception] = []
    stop = threading.Event()

    def record(model: str, seed: int):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(200):
                ids = rng.integers(0, 3, rng.integers(1, 40)).astype(np.int32)
                hit = cache.lookup(model, ids)
                recorder = Recorder(cache, model, ids, 0 if hit is None else hit[0])
                for n in range(recorder.fed + 1, len(ids) + 1):
                    recorder.stepped(*state_of(ids[:n]))
        except Exception as exc:  # reported by the test below
            errors.append(exc)

    def look():
        rng = np.random.default_rng(9)
        try:
            while not stop.is_set():
                ids = rng.integers(0, 3, 30).astype(np.int32)
                for model in ("a", "b"):
                    hit = cache.lookup(model, ids)
                    if hit is not None:
                        assert np.array_equal(hit[1], state_of(ids[: hit[0]])[0])
        except Exception as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(m, i)) for i, m in enumerate("ab")]
    looker = threading.Thread(target=look)
    for t in [*threads, looker]:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    looker.join(30)
    assert not errors, errors
    assert cache.bytes == recount(cache, "a") + recount(cache, "b") <= cache.max_bytes
    assert cache.bytes == cache.model_bytes("a") + cache.model_bytes("b") and cache.evicted > 0


def test_the_bound_is_checked():
    for bad in (-1, float("nan"), (1 << 20) + 1):
        with pytest.raises(ValueError, match=r"prefix_cache_mb must be in \[0, 1048576\] MiB"):
            Engine({}, Limits(prefix_cache_mb=bad))
    assert Engine({}, Limits(prefix_cache_mb=0)).prefix_cache is None
    assert Engine({}, Limits()).prefix_cache.max_bytes == 64 << 20


# ---------------------------------------------------------------------------- the servers
SHARED = (
    "the cat sat on the mat\na dog ran in the park\nwe saw the stars at night\n" * 2
)  # 144 chars


def limits(**kw) -> Limits:
    return Limits(
        max_chars=300,
        max_text=2000,
        max_sessions=16,
        max_wait=0.005,
        stream_interval=0.0,
        max_messages_per_s=0.0,
        **kw,
    )


@pytest.fixture(scope="module")
def servers(models_dir):
    """(with the cache, without it)."""
    on, off = (
        ServerThread(models_dir, limits()),
        ServerThread(models_dir, limits(prefix_cache_mb=0)),
    )
    yield on, off
    on.close()
    off.close()


def generate(server, **kw) -> tuple[str, list[float]]:
    seed = kw.pop("seed", None)
    req = pb.GenerateRequest(
        **{"model": CHAR_MODEL, "max_chars": 40, "temperature": 1.0, "logprobs": True, **kw}
    )
    if seed is not None:
        req.seed = seed
    out = list(server.stub.Generate(req))
    return "".join(r.text for r in out), [b for r in out for b in r.bits]


class Counts:
    """The cache's counters of a server, and how they moved since the last look."""

    NAMES = ("hits", "misses", "skipped_chars")

    def __init__(self, server) -> None:
        self.server = server
        self.last = self.now()

    def now(self) -> dict[str, float]:
        return {
            n: self.server.metric(f"nlstm_prefix_cache_{n}_total", {"model": CHAR_MODEL}) or 0.0
            for n in self.NAMES
        }

    def moved(self) -> dict[str, float]:
        now = self.now()
        moved, self.last = {n: now[n] - self.last[n] for n in self.NAMES}, now
        return moved


def test_a_row_of_a_batched_step_does_not_depend_on_the_other_rows(models_dir):
    """What bit-identity rests on: a state cached from a call that ran in a batch is the one
    a call alone computes (onnxruntime's CPU kernels reduce each row in the same order)."""
    from serving.server import load_models

    for threads in (1, 2):
        model = load_models(models_dir, providers="cpu", intra_op_threads=threads)[CHAR_MODEL]
        rng = np.random.default_rng(threads)
        ids = rng.integers(0, model.meta.vocab_size, 60)
        alone = model.initial_state(1)
        for i in ids:
            logits, alone = model.step(np.array([i]), alone)
        for batch, row in ((2, 1), (7, 3), (64, 0)):
            others = rng.integers(0, model.meta.vocab_size, (len(ids), batch))
            others[:, row] = ids
            state = model.initial_state(batch)
            for t in range(len(ids)):
                batch_logits, state = model.step(others[t], state)
            assert np.array_equal(state[row], alone[0]) and np.array_equal(
                batch_logits[row], logits[0]
            )


def test_the_same_seed_gives_the_same_text_with_and_without_the_cache(servers):
    on, off = servers
    counts = Counts(on)
    prompt = SHARED + "the stars "  # 154 characters, 155 symbols with the start symbol
    first = generate(on, prompt=prompt, seed=1)
    assert counts.moved() == {"hits": 0, "misses": 1, "skipped_chars": 0}
    again = generate(on, prompt=prompt, seed=1)
    assert counts.moved() == {
        "hits": 1,
        "misses": 0,
        "skipped_chars": len(prompt),
    }  # the whole prefill
    assert first == again == generate(off, prompt=prompt, seed=1)  # text and every character's bits
    assert first[0] != generate(on, prompt=prompt, seed=2)[0]
    counts.moved()
    # a longer prompt starting with that one starts at its end; one that parts from it at
    # character 100 starts at the last checkpoint before: symbol 96 (the start symbol and
    # 95 characters)
    longer, parted = prompt + "at night", prompt[:100] + "we ran"
    for p, skipped in ((longer, len(prompt)), (parted, 95)):
        for i, kw in enumerate(
            ({"seed": 3}, {"temperature": 0.0}, {"seed": 4, "top_k": 3}, {"seed": 5, "top_p": 0.8})
        ):
            assert generate(on, prompt=p, **kw) == generate(off, prompt=p, **kw), (p, kw)
            # the first call stored its prompt's end: the next ones skip the whole prompt
            assert counts.moved() == {
                "hits": 1,
                "misses": 0,
                "skipped_chars": skipped if i == 0 else len(p),
            }
    # an empty prompt is the start symbol alone: cached too
    assert generate(on, prompt="", seed=6) == generate(off, prompt="", seed=6)
    assert generate(on, prompt="", seed=6) == generate(off, prompt="", seed=6)
    assert counts.moved() == {"hits": 1, "misses": 1, "skipped_chars": 0}
    # without the cache nothing is counted and the bound reads 0
    assert Counts(off).now() == {"hits": 0, "misses": 0, "skipped_chars": 0}
    assert off.metric("nlstm_prefix_cache_max_bytes") == 0
    assert on.metric("nlstm_prefix_cache_max_bytes") == 64 << 20
    held = on.metric("nlstm_prefix_cache_bytes", {"model": CHAR_MODEL})
    assert 0 < held == on.running.engine.prefix_cache.bytes
    assert on.metric("nlstm_prefix_cache_entries", {"model": CHAR_MODEL}) >= 5


def test_a_fresh_session_uses_the_cache_and_scores_as_without_it(servers):
    """Generate on a fresh session starts from the cached prefix; the session then holds the
    same state as without the cache: the next Generate and a Score give the same figures."""
    on, off = servers
    prompt = SHARED + "a cat "
    generate(on, prompt=prompt, seed=0)  # the prefix states are in now
    counts = Counts(on)
    results = []
    for server in (on, off):
        sid = server.stub.CreateSession(pb.CreateSessionRequest(model=CHAR_MODEL)).session_id
        first = generate(server, model="", session_id=sid, prompt=prompt, seed=7)
        second = generate(
            server, model="", session_id=sid, prompt="the ", seed=8
        )  # not fresh: no lookup
        score = server.stub.Score(
            pb.ScoreRequest(session_id=sid, text="the dog sat on the mat", per_char=True)
        )
        results.append((first, second, score.total_bits, list(score.bits), score.boundaries))
        server.stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    assert results[0] == results[1]
    assert counts.moved() == {"hits": 1, "misses": 0, "skipped_chars": len(prompt)}
    # Score neither reads nor fills the cache
    entries = on.metric("nlstm_prefix_cache_entries", {"model": CHAR_MODEL})
    on.stub.Score(pb.ScoreRequest(model=CHAR_MODEL, text=SHARED + "x" * 70))
    assert counts.moved() == {"hits": 0, "misses": 0, "skipped_chars": 0}
    assert on.metric("nlstm_prefix_cache_entries", {"model": CHAR_MODEL}) == entries


def test_concurrent_calls_sharing_a_prompt_give_the_texts_of_calls_alone(servers):
    """Calls batched together while the cache fills (the first ones miss, later ones start
    from checkpoints the first are still writing) give each seed's text from the server
    without the cache, one call at a time."""
    on, off = servers
    prompt = SHARED.replace("cat", "dog") + "we "
    want = [generate(off, prompt=prompt + "the " * (i % 3), seed=i) for i in range(8)]
    got: list = [None] * 8

    def call(i):
        got[i] = generate(on, prompt=prompt + "the " * (i % 3), seed=i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_a_small_bound_evicts_and_still_gives_the_same_text(models_dir):
    """8 KiB: a few of the tiny model's entries (about 1.4 KB each with the trie's objects)."""
    server = ServerThread(models_dir, limits(prefix_cache_mb=8 / 1024))
    try:
        cache = server.running.engine.prefix_cache
        off = None
        rng = np.random.default_rng(0)
        words = SHARED.split()
        texts = []
        for i in range(12):
            prompt = " ".join(rng.choice(words, 20))
            texts.append((prompt, generate(server, prompt=prompt, seed=i)))
            assert cache.bytes == recount(cache, CHAR_MODEL) <= cache.max_bytes
        assert cache.evicted > 0 and cache.bytes > 0
        off = ServerThread(models_dir, limits(prefix_cache_mb=0))
        for i, (prompt, text) in enumerate(texts):
            assert generate(off, prompt=prompt, seed=i) == text
    finally:
        server.close()
        if off is not None:
            off.close()


# ----------------------------------------------------------------------- the flag, for real
def test_the_flag_and_its_environment_variable_on_nlstm_serve(models_dir, monkeypatch):
    from serving.testing.process import Server
    from training.cli import main as cli_main

    for bad in ("-1", str((1 << 20) + 1)):
        assert cli_main(["serve", "--models", str(models_dir), "--prefix-cache-mb", bad]) == 2
    monkeypatch.setenv("NLSTM_PREFIX_CACHE_MB", "3")
    with Server(models_dir) as server:
        assert server.metric("nlstm_prefix_cache_max_bytes") == 3 << 20
        server.stop()
    with Server(models_dir, "--prefix-cache-mb", "0") as server:  # the flag wins over the variable
        assert server.metric("nlstm_prefix_cache_max_bytes") == 0
        server.stop()
    monkeypatch.setenv("NLSTM_PREFIX_CACHE_MB", "lots")
    with pytest.raises(SystemExit, match="NLSTM_PREFIX_CACHE_MB='lots' is not a valid int"):
        cli_main(["serve", "--models", str(models_dir)])
