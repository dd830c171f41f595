"""Greedy decoding of rows that join and leave between steps (continuous batching).

On a CPU, one decoding step reads all the weights whatever the batch (SmolLM2-135M, one thread,
linear layers packed for oneDNN by ``training.packed_linear``: ~65 ms for one row, ~85 ms for
eight), so rows decoded together share that cost. A row joins after its prefill
and leaves at its stop token, its token limit, or when the caller drops it (a client that left, a
deadline); the others carry on. The service's scheduler admits waiting questions between steps, so
a question never waits for a whole batch to finish; evaluation admits all its prompts at once.

All rows share one key/value cache in which each row sits right-aligned, with its own attention
mask and positions, so padding and gaps change nothing; the cache has room for the tokens still to
come, so a step writes into it instead of concatenating it again, a row that leaves is replaced by
the last one (swap-remove) and a cached row that joins is written into a free row, so neither copies
the running rows (together 1.3-1.6x the throughput of 8 askers, docs/BENCHMARKS.md). A prefix cache
(``training.prefix_cache``) lets a row's prefill start after the longest cached prefix of its prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, DynamicLayer, PreTrainedModel

from training.prefix_cache import PrefixCache

JOIN_IN_STEP_TOKENS = 2
"""While rows decode, new rows whose uncached tails are at most this long (a question asked again,
a prompt cached but its last token) join the next decoding step itself: one forward pass gives
the running rows their next token and the new rows their first; the running rows compute the
tail's extra positions as masked padding, cheap at this length."""

SLACK_TOKENS = 32
"""Extra positions of room in a running batch's cache: rows that join a running batch are then
written into it in place for the next ~``SLACK_TOKENS`` steps, instead of copying every running
row's cache into a new one at each join."""

TOGETHER_TOKENS = 64
"""Rows whose uncached prompt tails are all at most this long prefill as one forward pass (about one
read of the weights for all); longer tails cost their tokens' compute either way, and prefilling
them one by one lets each row's first token out as soon as its own prompt is read."""


@dataclass
class _Row:
    key: Hashable
    max_new_tokens: int
    adapter: str | None
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Block:
    """Prefilled rows before they join: key/values per layer ``[rows, heads, n, dim]``, each row's
    attention mask over those ``n`` positions, its next position and its first token."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    attention: torch.Tensor
    positions: torch.Tensor
    first: list[int]


class _RoomyLayer(DynamicLayer):
    """A cache layer over a preallocated buffer: each step writes the new key/values into the room
    left for them (``DynamicLayer`` concatenates the whole cache at every step: ~40 ms of a ~160 ms
    step for 8 rows of ~220 tokens, SmolLM2-135M, one CPU thread)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._keys, self._values = keys, values
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self._keys.shape[-2]:  # out of room (never, for the tokens it was sized for): grow
            self._keys, self._values = _right_aligned([(self.keys, self.values)], n, room=max(n, m))
        self._keys[:, :, n:n + m] = key_states
        self._values[:, :, n:n + m] = value_states
        self.keys, self.values = self._keys[:, :, :n + m], self._values[:, :, :n + m]
        return self.keys, self.values


class DecodeBatch:
    """Rows decoding greedily together. ``admit`` prefills and adds rows, ``step`` decodes one token
    for every row, ``drop`` removes rows; a row that ended is in ``finished`` (its tokens, stop token
    excluded) until the caller pops it. Not thread-safe: one thread drives it."""

    def __init__(self, model: PreTrainedModel, stop_ids: set[int], pad_id: int,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.model, self.stop_ids, self.pad_id, self.prefix_cache = model, stop_ids, pad_id, prefix_cache
        self.rows: list[_Row] = []
        self.finished: dict[Hashable, list[int]] = {}
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # buffers [rows, heads, capacity, dim]
        self._length = 0
        self._attention = torch.zeros((0, 0), dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)
        self._next = torch.zeros(0, dtype=torch.long)
        self._pending: list[tuple] = []  # (ids, key, max_new_tokens, adapter, namespace): join at the next step

    def __len__(self) -> int:
        return len(self.rows) + len(self._pending)

    # --- joining ------------------------------------------------------------------------------

    @torch.no_grad()
    def admit(self, prompts: list[torch.Tensor], keys: list[Hashable], max_new_tokens: list[int],
              adapters: list[str | None] | None = None, namespaces: list[Hashable] | None = None,
              on_first: Callable[[Hashable, int | None], None] | None = None) -> None:
        """Prefill ``prompts`` (1-D token ids) and add them as rows (or, for prompts all but cached
        while rows decode, at the next ``step``: ``JOIN_IN_STEP_TOKENS``). ``adapters``: each row's PEFT
        adapter name (``None``: no PEFT model; ``"__base__"``: the base under PEFT). ``namespaces``:
        each row's prefix-cache namespace. ``on_first(key, token)`` hears each row's first token
        as soon as it exists (``None``: the row ended at once, at a stop token)."""
        if not prompts:
            return
        adapters = adapters or [None] * len(prompts)
        namespaces = namespaces or [None] * len(prompts)
        cache = self.prefix_cache
        cached = [cache.cached_length(ns, ids.tolist()) if cache else 0 for ids, ns in zip(prompts, namespaces)]
        if self.rows and max(len(ids) - c for ids, c in zip(prompts, cached)) <= JOIN_IN_STEP_TOKENS:
            self._pending += [(ids, key, limit, adapter, ns) for ids, key, limit, adapter, ns
                              in zip(prompts, keys, max_new_tokens, adapters, namespaces)]
            return
        if len(prompts) > 1 and max(len(ids) - c for ids, c in zip(prompts, cached)) <= TOGETHER_TOKENS:
            blocks = [self._prefill_together(prompts, adapters, namespaces)]
            firsts = blocks[0].first
            if on_first is not None:
                for key, token in zip(keys, firsts):
                    on_first(key, None if token in self.stop_ids else token)
        else:
            blocks, firsts = [], []
            for ids, key, adapter, ns in zip(prompts, keys, adapters, namespaces):
                blocks.append(self._prefill_alone(ids, adapter, ns))
                firsts.append(blocks[-1].first[0])
                if on_first is not None:
                    on_first(key, None if firsts[-1] in self.stop_ids else firsts[-1])
        new = [_Row(key, limit, adapter, [token]) for key, limit, adapter, token
               in zip(keys, max_new_tokens, adapters, firsts)]
        self._join(blocks, new)
        self._remove([len(self.rows) - len(new) + i for i, row in enumerate(new)  # ended at their first token
                      if row.tokens[0] in self.stop_ids or row.max_new_tokens <= 1])

    def _forward(self, input_ids, attention, positions, cache, adapters: list[str | None]):
        # under PEFT every row names its adapter; a row that joined before PEFT wrapped the model is on the base
        extra = {"adapter_names": [a or "__base__" for a in adapters]} if any(a is not None for a in adapters) else {}
        return self.model(input_ids=input_ids.to(self.model.device), attention_mask=attention.to(self.model.device),
                          position_ids=positions.to(self.model.device), past_key_values=cache, use_cache=True,
                          logits_to_keep=1, **extra)

    def _prefill_alone(self, ids: torch.Tensor, adapter: str | None, namespace: Hashable) -> _Block:
        """One row after its cached prefix; it leaves its own prefix in the cache for the next."""
        start, cache = self.prefix_cache.lookup(namespace, ids.tolist()) if self.prefix_cache else (0, None)
        n = len(ids)
        out = self._forward(ids[None, start:], torch.ones((1, n), dtype=torch.long), torch.arange(start, n)[None],
                            cache, [adapter])
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        if self.prefix_cache is not None and not self.prefix_cache.holds(namespace, ids.tolist()):
            self.prefix_cache.store(namespace, ids.tolist(), layers)
        return _Block(layers, torch.ones((1, n), dtype=torch.long), torch.tensor([n]),
                      [int(out.logits[0, -1].argmax())])

    def _prefill_together(self, prompts: list[torch.Tensor], adapters: list[str | None],
                          namespaces: list[Hashable]) -> _Block:
        """All rows' uncached tails in one forward pass: each row's cached prefix right-aligned in
        the first ``P`` positions, its tail right-aligned in the next ``S``, the gaps masked."""
        hits = self._lookups(prompts, namespaces)
        starts = [start for start, _ in hits]
        P, S = max(starts), max(len(ids) - start for ids, start in zip(prompts, starts))
        input_ids = torch.full((len(prompts), S), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), P + S), dtype=torch.long)
        positions = torch.zeros((len(prompts), S), dtype=torch.long)
        _place_tails(prompts, starts, input_ids, attention, positions, P, first_row=0)
        cache = None
        if P > 0:
            template = next(c for _, c in hits if c is not None)
            prefix = [(c.layers[i].keys, c.layers[i].values) if c is not None else
                      (template.layers[i].keys[:, :, :0], template.layers[i].values[:, :, :0])
                      for i in range(len(template.layers)) for _, c in hits]
            per_layer = [prefix[i * len(hits):(i + 1) * len(hits)] for i in range(len(template.layers))]
            cache = DynamicCache()
            cache.layers = [_RoomyLayer(*_right_aligned(rows, P, room=S), P) for rows in per_layer]
        out = self._forward(input_ids, attention, positions, cache, adapters)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._keep_prompts(prompts, namespaces, layers, attention, first_row=0)
        return _Block(layers, attention, torch.tensor([len(ids) for ids in prompts]),
                      out.logits[:, -1].argmax(-1).tolist())

    def _lookups(self, prompts: list[torch.Tensor], namespaces: list[Hashable]) -> list[tuple]:
        """Each prompt's longest cached prefix: ``(length, cache or None)``."""
        return [self.prefix_cache.lookup(ns, ids.tolist()) if self.prefix_cache else (0, None)
                for ids, ns in zip(prompts, namespaces)]

    def _keep_prompts(self, prompts: list[torch.Tensor], namespaces: list[Hashable],
                      layers: list[tuple[torch.Tensor, torch.Tensor]], attention: torch.Tensor, first_row: int) -> None:
        """Leave each new row's prompt in the prefix cache: its key/values at the positions its
        attention mask marks (``layers`` hold at least as many positions as the mask)."""
        if self.prefix_cache is None:
            return
        width = attention.shape[1]
        for row, (ids, ns) in enumerate(zip(prompts, namespaces), start=first_row):
            if not self.prefix_cache.holds(ns, ids.tolist()):
                keep = attention[row].bool()
                self.prefix_cache.store(ns, ids.tolist(), [(k[row:row + 1, :, :width][:, :, keep],
                                                            v[row:row + 1, :, :width][:, :, keep]) for k, v in layers])

    def _join(self, blocks: list[_Block], new: list[_Row]) -> None:
        """The running rows and the new blocks in one cache, right-aligned at the longest, with room
        for the most tokens any row may still generate."""
        length = max([self._length] + [b.attention.shape[1] for b in blocks])
        rows = self.rows + new
        room = max(row.max_new_tokens - len(row.tokens) for row in rows) + 1
        sources = ([(self._layer_views(), self._attention)] if self.rows else []) + \
                  [(b.layers, b.attention) for b in blocks]
        attention = torch.cat([torch.cat([a.new_zeros(a.shape[0], length - a.shape[1]), a], dim=1)
                               for _, a in sources])
        self._layers = []
        for i in range(len(sources[0][0])):
            parts = [(layers[i][0], layers[i][1]) for layers, _ in sources]
            self._layers.append(_right_aligned(parts, length, room + SLACK_TOKENS))
        self._length, self._attention, self.rows = length, attention, rows
        self._positions = torch.cat([self._positions] + [b.positions for b in blocks])
        self._next = torch.cat([self._next] + [torch.tensor(b.first) for b in blocks])

    def _layer_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[:, :, :self._length], v[:, :, :self._length]) for k, v in self._layers]

    # --- decoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> dict[Hashable, int | None]:
        """One token for every row: ``{key: token}``, ``None`` for a row that reached a stop token
        (it leaves; so does a row at its token limit, after its last token)."""
        if self._pending:
            return self._step_joining()
        if not self.rows:
            return {}
        cache = DynamicCache()
        cache.layers = [_RoomyLayer(k, v, self._length) for k, v in self._layers]
        attention = torch.cat([self._attention, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        out = self._forward(self._next[:, None], attention, self._positions[:, None], cache,
                            [row.adapter for row in self.rows])
        self._layers = [(layer._keys, layer._values) for layer in cache.layers]
        self._length += 1
        self._attention, self._positions = attention, self._positions + 1
        return self._take_tokens(out.logits[:, -1].argmax(-1).cpu())

    def _take_tokens(self, next_tokens: torch.Tensor) -> dict[Hashable, int | None]:
        """Each row's new token; rows at a stop token or their limit leave."""
        self._next = next_tokens
        tokens, ended = {}, []
        for i, (row, token) in enumerate(zip(self.rows, self._next.tolist())):
            if token in self.stop_ids:
                tokens[row.key] = None
                ended.append(i)
            else:
                row.tokens.append(token)
                tokens[row.key] = token
                if len(row.tokens) >= row.max_new_tokens:
                    ended.append(i)
        self._remove(ended)
        return tokens

    def _step_joining(self) -> dict[Hashable, int | None]:
        """A decoding step that also prefills the pending rows' short tails: every row's input is
        right-aligned in ``S`` new positions (a running row's is its next token), after a cache in
        which the running rows and the pending rows' cached prefixes are right-aligned at one length."""
        pending, self._pending = self._pending, []
        if not self.rows:  # the running rows were dropped meanwhile: an ordinary admission
            firsts: dict[Hashable, int | None] = {}
            prompts, keys, limits, adapters, namespaces = (list(column) for column in zip(*pending))
            self.admit(prompts, keys, limits, adapters, namespaces, on_first=firsts.__setitem__)
            return firsts
        prompts, namespaces = [p[0] for p in pending], [p[4] for p in pending]
        hits = self._lookups(prompts, namespaces)
        starts = [start for start, _ in hits]
        running = len(self.rows)
        length = max([self._length] + starts)
        S = max([1] + [len(ids) - start for (ids, *_), start in zip(pending, starts)])
        new = [_Row(key, limit, adapter) for _, key, limit, adapter, _ in pending]
        rows = self.rows + new
        room = S + max(row.max_new_tokens - len(row.tokens) for row in rows) + 1
        layers = self._in_place(hits, length, room, len(rows))
        if layers is None:
            views = self._layer_views()
            layers = [_right_aligned([views[i]] + [(c.layers[i].keys, c.layers[i].values) if c is not None else
                                                   (views[i][0][:1, :, :0], views[i][1][:1, :, :0]) for _, c in hits],
                                     length, room + SLACK_TOKENS) for i in range(len(views))]
        total = len(rows)
        input_ids = torch.full((total, S), self.pad_id, dtype=torch.long)
        attention = torch.zeros((total, length + S), dtype=torch.long)
        positions = torch.zeros((total, S), dtype=torch.long)
        attention[:running, length - self._length:length] = self._attention
        attention[:running, -1] = 1
        input_ids[:running, -1], positions[:running, -1] = self._next, self._positions
        _place_tails(prompts, starts, input_ids, attention, positions, length, first_row=running)
        cache = DynamicCache()
        cache.layers = [_RoomyLayer(k, v, length) for k, v in layers]
        out = self._forward(input_ids, attention, positions, cache, [row.adapter for row in rows])
        self._layers = [(layer._keys, layer._values) for layer in cache.layers]
        self._length, self._attention, self.rows = length + S, attention, rows
        self._positions = torch.cat([self._positions + 1, torch.tensor([len(ids) for ids in prompts])])
        self._keep_prompts(prompts, namespaces, self._layers, attention, first_row=running)
        return self._take_tokens(out.logits[:, -1].argmax(-1).cpu())

    def _in_place(self, hits: list[tuple], length: int, room: int,
                  total: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The running rows' cache buffers widened to ``total`` rows, the joining rows' cached
        prefixes written right-aligned at ``length`` in the new rows: no running row is copied.
        ``None`` (the caller rebuilds the cache) when the buffers hold fewer than ``total`` rows
        (free rows exist only where rows left since the buffers were allocated), lack the ``room``
        after ``length``, or a joining prefix is longer than the running rows' (``length`` moved)."""
        if length != self._length:
            return None
        widened = []
        for k, v in self._layers:
            kb, vb = (k if k._base is None else k._base), (v if v._base is None else v._base)
            fits = kb.shape[0] >= total and kb.shape[2] >= length + room
            if not (fits and kb.shape[1:] == k.shape[1:] and kb.data_ptr() == k.data_ptr() and kb.stride() == k.stride()
                    and vb.shape[1:] == v.shape[1:] and vb.data_ptr() == v.data_ptr() and vb.stride() == v.stride()):
                return None
            widened.append((kb[:total], vb[:total]))
        running = len(self.rows)
        for i, (k, v) in enumerate(widened):
            k[running:].zero_()
            v[running:].zero_()
            for row, (_, cached) in enumerate(hits, start=running):
                if cached is not None:
                    n = cached.layers[i].keys.shape[2]
                    k[row:row + 1, :, length - n:length] = cached.layers[i].keys
                    v[row:row + 1, :, length - n:length] = cached.layers[i].values
        return widened

    def drop(self, keys: set[Hashable]) -> None:
        """Remove these rows now (their tokens so far go to ``finished``)."""
        for ids, key, *_ in [p for p in self._pending if p[1] in keys]:
            self.finished[key] = []
        self._pending = [p for p in self._pending if p[1] not in keys]
        self._remove([i for i, row in enumerate(self.rows) if row.key in keys])

    def _remove(self, indices: list[int]) -> None:
        """Rows leave by swap-remove: the last surviving rows move into the holes (only their
        key/values are copied) and the buffers are narrowed, instead of copying every row's cache at
        every leave (~5 % of an 8-asker server's decoding thread, profiled)."""
        if not indices:
            return
        gone = set(indices)
        for i in gone:
            row = self.rows[i]
            self.finished[row.key] = [t for t in row.tokens if t not in self.stop_ids][:row.max_new_tokens]
        n = len(self.rows) - len(gone)
        holes = sorted(i for i in gone if i < n)
        movers = [i for i in range(n, len(self.rows)) if i not in gone]  # as many as the holes
        if holes:
            src, dst = torch.tensor(movers), torch.tensor(holes)
            for k, v in self._layers:
                k[dst.to(k.device)] = k[src.to(k.device)]
                v[dst.to(v.device)] = v[src.to(v.device)]
            for i, j in zip(holes, movers):
                self.rows[i] = self.rows[j]
            self._attention, self._positions, self._next = (t.clone() for t in (self._attention, self._positions,
                                                                                self._next))
            for t in (self._attention, self._positions, self._next):
                t[dst] = t[src]
        self.rows = self.rows[:n]
        self._layers = [(k[:n], v[:n]) for k, v in self._layers]
        self._attention, self._positions, self._next = self._attention[:n], self._positions[:n], self._next[:n]
        if not self.rows:
            self._layers, self._length = [], 0
            self._attention = torch.zeros((0, 0), dtype=torch.long)


def _place_tails(prompts: list[torch.Tensor], starts: list[int], input_ids: torch.Tensor, attention: torch.Tensor,
                 positions: torch.Tensor, length: int, first_row: int) -> None:
    """Rows ``first_row...``: each prompt's uncached tail right-aligned in the ``S`` input positions
    (at its own positions), its cached prefix marked right-aligned at ``length`` in the mask."""
    S = input_ids.shape[1]
    for row, (ids, start) in enumerate(zip(prompts, starts), start=first_row):
        tail = len(ids) - start
        input_ids[row, S - tail:] = ids[start:]
        attention[row, length - start:length] = attention[row, length + S - tail:length + S] = 1
        positions[row, S - tail:] = torch.arange(start, len(ids))


def _right_aligned(parts: list[tuple[torch.Tensor, torch.Tensor]], length: int, room: int):
    """Blocks of rows' key/values ``[b, heads, n, dim]`` stacked and right-aligned at ``length`` in
    zeroed buffers ``[sum b, heads, length + room, dim]``."""
    k0, v0 = parts[0]
    total = sum(k.shape[0] for k, _ in parts)
    keys = k0.new_zeros(total, k0.shape[1], length + room, k0.shape[3])
    values = v0.new_zeros(total, v0.shape[1], length + room, v0.shape[3])
    row = 0
    for k, v in parts:
        keys[row:row + k.shape[0], :, length - k.shape[2]:length] = k
        values[row:row + v.shape[0], :, length - v.shape[2]:length] = v
        row += k.shape[0]
    return keys, values
