"""The prefix-state cache: the (state, logits) a model reaches after the opening symbols of
a prompt, kept so that later calls sharing that opening skip its prefill.

A fresh sequence (a call without a session, or on a session that has taken in nothing yet)
starts from the model's initial state and feeds the start symbol, then the prompt, one step
per symbol. Every such sequence that feeds the same symbols reaches the same state, bit for
bit: rows of a batched step do not depend on the other rows (onnxruntime's CPU kernels;
tests/test_prefix_cache.py checks it; docs/serving.md says what may differ on CUDA).
So the cache keys states by the ids fed from the initial state, start symbol first, in a
trie per model, and a call starts from the deepest cached prefix of its own ids and feeds
only the rest; what it then computes is what it would have computed anyway.

Which prefixes are stored: the state after every `every`-th symbol (32 by default) and at
the prompt's end. The end serves a prompt sent again as it is (the whole prefill skipped);
the regular checkpoints serve a long shared opening followed by different endings (an
instruction, a document, then each user's question), whose divergence point no call knows in
advance: such a call recomputes at most `every` - 1 symbols of the shared part. Storing
every symbol's state would multiply the memory by 32 for at most 31 steps saved per call;
storing only prompt ends would miss every prompt that is not repeated whole.

Bound and eviction: a byte budget over all models together (`nlstm serve
--prefix-cache-mb`), least-recently-used entries evicted first (an entry is used when a
lookup starts from it). Bytes are counted exactly as `bytes`: each entry's state and logits
(their nbytes), each trie edge's ids (int32), and a fixed estimate of the Python objects
around them (NODE_BYTES per node, ENTRY_BYTES per entry, measured with tracemalloc in
tests/test_prefix_cache.py). The trie is compressed (a radix tree): a node exists only where
an entry is or where two prompts part, so a 2,000-character prompt costs 63 nodes, not
2,000.

Threads: lookups come from the event loop (the engine, when a call starts), inserts from
each model's scheduler thread (as a prompt's steps complete), gauges from the metrics
scrape; one lock guards the trie. Cached arrays are read-only: a call's sequence reads them
(the scheduler stacks them into a batch, a session copies them), nobody writes into them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

# Python objects around the arrays, in bytes (measured on CPython 3.11, numpy 2.4, 64-bit; see the
# module doc): a node's object, its children dict and its edge array's header; an entry's two
# array headers, its tuple and its slot in the LRU order.
NODE_BYTES = 400
ENTRY_BYTES = 400
IDS = np.int32  # the dtype of the trie's edges: ids of the models' vocabularies


class _Node:
    """A trie node: the symbols on the edge from its parent (`label`), its children by their
    edge's first symbol, and maybe an entry, the (state, logits) after the symbols on the path
    from the root. `depth` (symbols from the root) never changes while the node lives: splits
    add nodes above existing ones, merges remove the upper one."""

    __slots__ = ("label", "children", "parent", "entry", "depth", "model", "dead")

    def __init__(self, label: np.ndarray, parent: _Node | None, depth: int, model: str) -> None:
        self.label = label
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.entry: tuple[np.ndarray, np.ndarray] | None = None
        self.depth = depth
        self.model = model
        self.dead = False  # removed from the trie (a recorder's cursor must not continue from it)


def entry_bytes(state: np.ndarray, logits: np.ndarray) -> int:
    return state.nbytes + logits.nbytes + ENTRY_BYTES


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading symbols a and b share."""
    k = min(len(a), len(b))
    differ = np.flatnonzero(a[:k] != b[:k])
    return int(differ[0]) if len(differ) else k


class PrefixCache:
    """(state, logits) after prefixes of fed ids, per model, in `max_bytes` at most."""

    def __init__(self, max_bytes: int, every: int = 32, metrics=None) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.max_bytes, self.every = max_bytes, every
        self._lock = threading.Lock()
        self._roots: dict[str, _Node] = {}
        self._lru: OrderedDict[_Node, None] = (
            OrderedDict()
        )  # nodes with entries, least recent first
        self.bytes = 0  # everything held (see the module doc), all models
        self._model_bytes: dict[str, int] = {}
        self._model_entries: dict[str, int] = {}
        self.evicted = 0  # entries evicted to stay within max_bytes
        self._metrics = metrics
        if metrics is not None:
            metrics.prefix_cache_max_bytes.set(max_bytes)

    def add_model(self, model: str) -> None:
        """Serve `model` (its gauges report from now on)."""
        with self._lock:
            if model in self._roots:
                return
            self._roots[model] = _Node(np.empty(0, IDS), None, 0, model)
            self._model_bytes[model] = self._model_entries[model] = 0
        if self._metrics is not None:
            self._metrics.prefix_cache_bytes.labels(model).set_function(
                lambda: self._model_bytes[model]
            )
            self._metrics.prefix_cache_entries.labels(model).set_function(
                lambda: self._model_entries[model]
            )

    # ---------------------------------------------------------------------- the engine's side
    def start(self, model: str, feed: list[int], state: np.ndarray):
        """A fresh sequence of `model` is about to feed `feed` (start symbol first) from the
        initial `state`: returns (state, logits, the part of feed still to feed, a recorder
        for the sequence or None). On a hit, state and logits are the cached ones after the
        deepest cached prefix of feed (else the initial state and None); the recorder stores
        this prompt's checkpoints still missing as the sequence's steps complete."""
        ids = np.asarray(feed, dtype=IDS)
        node, entry = self._lookup(model, ids)
        n, logits = 0, None
        if node is not None:
            n, (state, logits) = node.depth, entry
        if self._metrics is not None:
            if node is None:
                self._metrics.prefix_cache_misses.labels(model).inc()
            else:
                self._metrics.prefix_cache_hits.labels(model).inc()
                # the start symbol is not a character of the prompt
                self._metrics.prefix_cache_skipped_chars.labels(model).inc(n - 1)
        recorder = Recorder(self, model, ids, n, node) if n < len(ids) else None
        return state, logits, feed[n:], recorder

    # ----------------------------------------------------------------------------- the trie
    def lookup(self, model: str, ids: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(n, state, logits) of the deepest entry whose symbols are ids[:n], or None; that
        entry becomes the most recently used."""
        node, entry = self._lookup(model, ids)
        return None if node is None else (node.depth, *entry)

    def _lookup(self, model: str, ids: np.ndarray):
        """(node, its entry) of lookup()'s entry, or (None, None); the entry is read under the
        lock, as an eviction may take it from the node the moment the lock is let go."""
        with self._lock:
            node, d, best = self._roots[model], 0, None
            while d < len(ids):
                child = node.children.get(int(ids[d]))
                if child is None:
                    break
                m = len(child.label)
                if d + m > len(ids) or not np.array_equal(child.label, ids[d : d + m]):
                    break  # the prompt parts from the trie inside this edge
                node, d = child, d + m
                if node.entry is not None:
                    best = node
            if best is None:
                return None, None
            self._lru.move_to_end(best)
            return best, best.entry

    def insert(
        self,
        model: str,
        ids: np.ndarray,
        n: int,
        state: np.ndarray,
        logits: np.ndarray,
        cursor: _Node | None = None,
    ) -> _Node | None:
        """Keep (state, logits) as the entry after ids[:n] (copies, read-only); an existing
        entry there is kept and becomes the most recently used. `cursor`: a node on the path
        of ids at a depth <= n, from which to walk (the node an earlier insert of the same
        ids returned). Returns the node of ids[:n], or None when it was not kept (an entry
        larger than the whole budget, or evicted at once)."""
        size = entry_bytes(state, logits)
        if size + NODE_BYTES + 4 * n > self.max_bytes:
            return None
        with self._lock:
            start = cursor if cursor is not None and not cursor.dead and cursor.depth <= n else None
            node = self._descend(model, ids, n, start or self._roots[model])
            if node.entry is None:
                state, logits = state.copy(), logits.copy()
                state.flags.writeable = logits.flags.writeable = False
                node.entry = (state, logits)
                self._grow(model, size)
                self._model_entries[model] += 1
            self._lru[node] = None
            self._lru.move_to_end(node)
            while self.bytes > self.max_bytes:
                self._evict(next(iter(self._lru)))
            return None if node.dead else node

    def _descend(self, model: str, ids: np.ndarray, n: int, node: _Node) -> _Node:
        """The node of ids[:n], created (splitting an edge where ids part from it) if needed;
        starts at `node`, which is on that path."""
        d = node.depth
        while d < n:
            child = node.children.get(int(ids[d]))
            if child is None:
                leaf = _Node(ids[d:n].copy(), node, n, model)
                node.children[int(ids[d])] = leaf
                self._grow(model, NODE_BYTES + leaf.label.nbytes)
                return leaf
            m = _common(child.label, ids[d:n])
            if m < len(child.label):  # split the edge: a new node at depth d + m above child
                mid = _Node(child.label[:m].copy(), node, d + m, model)
                child.label = child.label[m:].copy()
                child.parent = mid
                mid.children[int(child.label[0])] = child
                node.children[int(ids[d])] = mid
                self._grow(model, NODE_BYTES)  # the edge's ids are the same, now on two nodes
                child = mid
            node, d = child, d + m
        return node

    def _evict(self, node: _Node) -> None:
        """Drop node's entry, then the nodes no entry needs any more."""
        del self._lru[node]
        assert node.entry is not None  # the LRU order holds the nodes with an entry
        state, logits = node.entry
        node.entry = None
        self._grow(node.model, -entry_bytes(state, logits))
        self._model_entries[node.model] -= 1
        self.evicted += 1
        while node.parent is not None and node.entry is None and len(node.children) <= 1:
            parent = node.parent
            if node.children:  # one child: it takes this node's edge (its depth stays)
                (child,) = node.children.values()
                child.label = np.concatenate([node.label, child.label])
                child.parent = parent
                parent.children[int(node.label[0])] = child
                self._grow(node.model, -NODE_BYTES)
            else:  # a leaf
                del parent.children[int(node.label[0])]
                self._grow(node.model, -(NODE_BYTES + node.label.nbytes))
            node.dead = True
            node = parent

    def _grow(self, model: str, delta: int) -> None:
        self.bytes += delta
        self._model_bytes[model] += delta

    # ------------------------------------------------------------------------- reading
    def model_bytes(self, model: str) -> int:
        return self._model_bytes.get(model, 0)

    def entries(self, model: str) -> int:
        return self._model_entries.get(model, 0)

    def nodes(self, model: str) -> Iterable[_Node]:
        """Every node of model's trie below the root (a snapshot, taken under the lock)."""
        with self._lock:
            out, todo = [], list(self._roots[model].children.values())
            while todo:
                node = todo.pop()
                out.append(node)
                todo.extend(node.children.values())
            return out


class Recorder:
    """Stores a fresh sequence's checkpoints as its prompt's steps complete: called by the
    sequence on the scheduler thread once per step fed (GenerateSequence.advance)."""

    __slots__ = ("cache", "model", "ids", "fed", "cursor")

    def __init__(
        self, cache: PrefixCache, model: str, ids: np.ndarray, fed: int, cursor: _Node | None = None
    ) -> None:
        self.cache, self.model, self.ids = cache, model, ids
        self.fed = fed  # symbols of ids in the sequence's state
        # a node on ids' path (the hit, then the last node inserted): the next walk starts there
        self.cursor = cursor

    def stepped(self, state: np.ndarray, logits: np.ndarray) -> bool:
        """One more symbol of ids is in (state, logits): keep a checkpoint where one is due.
        Returns whether the prompt has symbols left (False: the sequence can drop this)."""
        self.fed += 1
        n = self.fed
        if n % self.cache.every == 0 or n == len(self.ids):
            self.cursor = self.cache.insert(self.model, self.ids, n, state, logits, self.cursor)
        return n < len(self.ids)


__all__ = ["ENTRY_BYTES", "NODE_BYTES", "PrefixCache", "Recorder"]
