"""Iteration-level (continuous) batching over a slotted static KV cache, for Llama-layout LLMs.

    SlotDecoder         the language model's decoder layers over a preallocated KV cache of `slots`
                        rows (layers, slots, 2 x kv_heads, max_len, head_dim). Each row sits in its
                        own slot at its own position:
                          prefill(slot, embeds)      one row's prompt embeddings (T, hidden), alone,
                                                     into its slot at positions 0..T-1
                          decode(tokens, positions)  one token for each of the rows in slots 0..n-1,
                                                     each at its own position and attending only to
                                                     its own keys (mask: key position <= row position)
                        On a GPU each decode shape (batch bucket x key-length bucket) is captured in a
                        CUDA graph on first use and replayed afterwards.
    ContinuousBatcher   rows join between decode steps (`add`: prefill + first token) and leave as
                        soon as they finish (EOS, their own max_new_tokens, or `finish` for a stop
                        string), each with its own sampling settings and its own torch.Generator.

Why a written-out decoder rather than transformers' forward: one decode step must have no host
synchronisation and a fixed set of kernels to be captured in a CUDA graph, and per-row cache
positions are not something transformers' caches express (their `cache_position` is shared by the
batch). It reads the Hugging Face module's own weights (q/k/v and gate/up fused into one matrix
each, the module's Linear weights made views of them, so no memory is duplicated) and the module's
own rotary tables; tests compare its tokens with `generate` (greedy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, PreTrainedModel, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

LENGTH_BUCKET = 256  # decode attends to the first multiple of this many cache positions that holds every row


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. Greedy ignores temperature and top_p, so all greedy rows are
    normalised alike."""

    do_sample: bool
    temperature: float
    top_p: float

    @classmethod
    def of(cls, request) -> "Sampling":
        """From anything with `do_sample`, `temperature` and `top_p` (a parsed chat request)."""
        return cls(True, request.temperature, request.top_p) if request.do_sample else cls(False, 1.0, 1.0)


def unsupported_reason(llm: PreTrainedModel) -> str | None:
    """Why `SlotDecoder` cannot run this language model, or None when it can."""
    config = llm.config
    if config.model_type != "llama":
        return f"model_type {config.model_type!r} (the slot decoder implements the Llama layout)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(llm.model.rotary_emb, "rope_type", "default") == "dynamic":
        return "dynamic RoPE scaling (its frequencies change with the sequence length)"
    return None


class SlotDecoder:
    """A Llama decoder over a KV cache of `slots` rows x `max_len` positions (see the module docstring).

    Build it after the model is on its device and in its dtype: it fuses the weights where they are,
    and the Linear weights become views of the fused matrices (save the model before, not after).
    """

    def __init__(self, llm: PreTrainedModel, slots: int, max_len: int, cuda_graphs: bool | None = None):
        reason = unsupported_reason(llm)
        if reason is not None:
            raise ValueError(f"SlotDecoder cannot run this language model: {reason}")
        config = llm.config
        self.llm, self.slots, self.max_len = llm, slots, max_len
        first = llm.model.layers[0].self_attn
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, first.head_dim
        self.eps = config.rms_norm_eps
        weight = llm.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.layers = [self._fuse(layer) for layer in llm.model.layers]
        # The module's own rotary tables (rope scaling included), half width: HF's cos is (c, c).
        with torch.no_grad():
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = llm.model.rotary_emb(weight[:1], positions)  # (1, L, head_dim), in the model's dtype
        half = self.head_dim // 2
        self.cos, self.sin = cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()  # (L, head_dim/2)
        self.cache = torch.zeros(len(self.layers), slots, 2 * self.n_kv, max_len, self.head_dim,
                                 device=self.device, dtype=self.dtype)  # fmt: skip
        self.key_positions = torch.arange(max_len, device=self.device)
        self.rows = torch.arange(slots, device=self.device)
        self.tokens_in = torch.zeros(slots, dtype=torch.long, device=self.device)  # decode inputs (graph-static)
        self.positions_in = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.round_batches = self.cuda_graphs  # fewer shapes to capture; settable to test it on the CPU

    @staticmethod
    @torch.no_grad()
    def _fuse(layer) -> dict[str, torch.Tensor]:
        """q/k/v and gate/up as one matrix each; the Linear layers then read views of them."""
        attn, mlp = layer.self_attn, layer.mlp
        fused = {}
        for name, linears in (("wqkv", (attn.q_proj, attn.k_proj, attn.v_proj)), ("w_gate_up", (mlp.gate_proj, mlp.up_proj))):
            matrix = torch.cat([linear.weight for linear in linears])  # (sum of outputs, hidden)
            start = 0
            for linear in linears:
                rows = linear.weight.shape[0]
                linear.weight.data = matrix[start:start + rows]
                start += rows
            fused[name] = matrix
        return {**fused, "wo": attn.o_proj.weight, "w_down": mlp.down_proj.weight,
                "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight}  # fmt: skip

    # -- the layers ----------------------------------------------------------------------------------

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Hugging Face's rotate-half RoPE. x: (B, T, heads, head_dim); cos, sin: (B or 1, T, 1, head_dim/2)."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """x: (B, T, hidden) -> final-normed hidden states of the last position, (B, hidden).
        `attend(layer, q (B, heads, T, hd), kv (B, 2 kv_heads, T, hd))` stores kv and attends."""
        B, T, D = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = x.reshape(B * T, D)
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (D,), w["ln1"], self.eps)
            qkv = (h @ w["wqkv"].t()).view(B, T, nh + 2 * nkv, hd)
            qk = self._rope(qkv[:, :, : nh + nkv], cos, sin)
            q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hd)
            kv = torch.cat([qk[:, :, nh:], qkv[:, :, nh + nkv:]], dim=2).transpose(1, 2)  # (B, 2 nkv, T, hd)
            out = attend(i, q, kv)  # (B, nh, T, hd)
            x = torch.addmm(x, out.transpose(1, 2).reshape(B * T, nh * hd), w["wo"].t())
            h = F.rms_norm(x, (D,), w["ln2"], self.eps)
            gate, up = (h @ w["w_gate_up"].t()).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w["w_down"].t())
        last = x.view(B, T, D)[:, -1]
        return F.rms_norm(last, (D,), self.llm.model.norm.weight, self.eps)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.llm.lm_head.weight.t()).float()  # (B, vocab), float32 as generate() scores

    # -- prefill: one row alone ----------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, slot: int, embeds: torch.Tensor) -> torch.Tensor:
        """A row's prompt embeddings (T, hidden) into `slot` at positions 0..T-1 -> next-token logits (vocab,)."""
        T = embeds.shape[0]
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside the cache's {self.slots} slots")
        if T >= self.max_len:
            raise ValueError(f"a prompt of {T} positions does not fit the cache's {self.max_len}")
        nkv = self.n_kv

        def attend(i, q, kv):
            self.cache[i, slot, :, :T] = kv[0]
            return F.scaled_dot_product_attention(q, kv[:, :nkv], kv[:, nkv:], is_causal=True,
                                                  enable_gqa=nkv != self.n_heads)  # fmt: skip

        cos, sin = self.cos[:T][None, :, None], self.sin[:T][None, :, None]
        hidden = self._layers(embeds.to(self.device, self.dtype)[None], cos, sin, attend)
        return self._logits(hidden)[0]

    # -- decode: every active row, one token ---------------------------------------------------------

    def _decode_shape(self, batch: int, length: int) -> torch.Tensor:
        """One step for slots 0..batch-1 from `tokens_in` / `positions_in`, attending to `length`
        cache positions -> logits (batch, vocab). No host synchronisation: graph-capturable, and
        idempotent (it writes each row's k/v at the row's position, so running it twice is harmless)."""
        nkv = self.n_kv
        rows, positions = self.rows[:batch], self.positions_in[:batch]
        visible = (self.key_positions[:length][None, :] <= positions[:, None])[:, None, None]  # (B, 1, 1, length)

        def attend(i, q, kv):
            self.cache[i][rows, :, positions] = kv[:, :, 0]
            keys, values = self.cache[i, :batch, :nkv, :length], self.cache[i, :batch, nkv:, :length]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=nkv != self.n_heads)

        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]
        embeds = self.llm.model.embed_tokens(self.tokens_in[:batch])[:, None]  # (B, 1, hidden)
        return self._logits(self._layers(embeds, cos, sin, attend))

    def _buckets(self, rows: int, top_position: int) -> tuple[int, int]:
        """(batch, key length) for a step. With graphs the batch is rounded up to a power of two (or
        `slots`), so few shapes are captured; the extra rows are free slots computing at position 0."""
        length = min(self.max_len, (top_position // LENGTH_BUCKET + 1) * LENGTH_BUCKET)
        if not self.round_batches:
            return rows, length
        batch = 1
        while batch < rows:
            batch *= 2
        return min(batch, self.slots), length

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Row i (in slot i) takes `tokens[i]` at `positions[i]` -> logits (len(tokens), vocab)."""
        n = len(tokens)
        if not 0 < n <= self.slots or len(positions) != n:
            raise ValueError(f"decode needs 1..{self.slots} rows with one position each, got {n} and {len(positions)}")
        if max(positions) >= self.max_len:
            raise ValueError(f"position {max(positions)} is past the cache's {self.max_len}")
        batch, length = self._buckets(n, max(positions))
        pad = [0] * (batch - n)
        self.tokens_in[:batch].copy_(torch.tensor(tokens + pad), non_blocking=True)
        self.positions_in[:batch].copy_(torch.tensor(positions + pad), non_blocking=True)
        if not self.cuda_graphs:
            return self._decode_shape(batch, length)[:n]
        graph, logits = self.graphs.get((batch, length)) or self._capture(batch, length)
        graph.replay()
        return logits[:n]

    @torch.no_grad()
    def capture_all(self) -> None:
        """Capture every decode shape now, so that no request waits for a capture. Only while no row
        is in the cache: the captures write garbage at position 0 of every slot."""
        if not self.cuda_graphs:
            return
        batches = sorted({self._buckets(rows, 0)[0] for rows in range(1, self.slots + 1)})
        lengths = sorted({self._buckets(1, position)[1] for position in range(0, self.max_len, LENGTH_BUCKET)})
        self.tokens_in.zero_()
        self.positions_in.zero_()
        for batch in batches:
            for length in lengths:
                if (batch, length) not in self.graphs:
                    self._capture(batch, length)

    def _capture(self, batch: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one decode shape (warm-up on a side stream first, as PyTorch requires)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_shape(batch, length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the replica's other threads (encoders) may use the GPU during a capture
        with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
            logits = self._decode_shape(batch, length)
        self.graphs[(batch, length)] = graph, logits
        return graph, logits

    @torch.no_grad()
    def move(self, source: int, target: int, length: int) -> None:
        """Copy a row's first `length` cache positions from one slot to another."""
        self.cache[:, target, :, :length] = self.cache[:, source, :, :length]


# --------------------------------------------------------------------------------------------------
# Rows joining and leaving between steps
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: Hashable
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator | None  # sampled rows only: this row's own random stream
    warpers: LogitsProcessorList | None
    position: int  # where the next input token (the last one chosen) goes in the cache
    token: int  # the last token chosen
    generated: int = 1


class ContinuousBatcher:
    """The decode loop's state: the rows in the cache, each with its own limits and sampling.

    Row i always sits in slot i: when a row leaves, the last row moves into its slot, so a step runs
    on slots 0..n-1. A row finishes at EOS or at its own `max_new_tokens` (`add` and `step` report
    it and free its slot), or when its owner calls `finish` (a stop string).
    """

    def __init__(self, decoder: SlotDecoder, eos_token_id: int | None, top_k: int | None = None):
        self.decoder = decoder
        self.eos_token_id = eos_token_id
        self.top_k = top_k  # the model's generation_config.top_k, as generate() applies it when sampling
        self.rows: list[Row] = []

    @property
    def free_slots(self) -> int:
        return self.decoder.slots - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: Hashable) -> bool:
        return any(row.key == key for row in self.rows)

    def add(self, key: Hashable, embeds: torch.Tensor, max_new_tokens: int, sampling: Sampling,
            seed: int | None = None) -> tuple[int, bool]:  # fmt: skip
        """Prefill a new row (prompt embeddings (T, hidden)) -> (its first token, whether it is done)."""
        if not self.free_slots:
            raise RuntimeError(f"all {self.decoder.slots} slots are taken")
        if key in self:
            raise ValueError(f"a row with key {key!r} is already running")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if embeds.shape[0] + max_new_tokens > self.decoder.max_len:
            raise ValueError(f"a prompt of {embeds.shape[0]} positions + max_new_tokens {max_new_tokens} exceeds "
                             f"the cache's {self.decoder.max_len} positions")  # fmt: skip
        generator = warpers = None
        if sampling.do_sample:
            generator = torch.Generator(self.decoder.device)
            if seed is None:
                generator.seed()  # a fresh random seed
            else:
                generator.manual_seed(seed)
            warpers = self._warpers(sampling)
        logits = self.decoder.prefill(len(self.rows), embeds)
        row = Row(key, max_new_tokens, sampling, generator, warpers, position=embeds.shape[0], token=-1)
        self.rows.append(row)
        row.token = self._choose([row], logits[None])[0]
        done = self._done(row)
        if done:
            self._remove(len(self.rows) - 1)
        return row.token, done

    def step(self) -> list[tuple[Hashable, int, bool]]:
        """One decode step for every row -> (key, token, done) per row, in slot order."""
        if not self.rows:
            return []
        logits = self.decoder.decode([row.token for row in self.rows], [row.position for row in self.rows])
        tokens = self._choose(self.rows, logits)
        results = []
        for row, token in zip(self.rows, tokens):
            row.token, row.position, row.generated = token, row.position + 1, row.generated + 1
            results.append((row.key, token, self._done(row)))
        for index in reversed(range(len(self.rows))):
            if results[index][2]:
                self._remove(index)
        return results

    def finish(self, key: Hashable) -> None:
        """Drop a row before its limit (its owner saw a stop string, or went away)."""
        for index, row in enumerate(self.rows):
            if row.key == key:
                self._remove(index)
                return

    def clear(self) -> None:
        self.rows.clear()

    # -- internals -----------------------------------------------------------------------------------

    def _done(self, row: Row) -> bool:
        return row.token == self.eos_token_id or row.generated >= row.max_new_tokens

    def _remove(self, index: int) -> None:
        last = len(self.rows) - 1
        if index != last:  # keep rows in slots 0..n-1: the last row takes the freed slot
            self.decoder.move(last, index, self.rows[last].position)
            self.rows[index] = self.rows[last]
        self.rows.pop()

    def _warpers(self, sampling: Sampling) -> LogitsProcessorList:
        """generate()'s sampling warpers, in its order: temperature, top-k, top-p."""
        warpers = LogitsProcessorList()
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        return warpers

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Greedy rows take the argmax; each sampled row draws from its warped distribution with
        its own generator, so its sample does not depend on the other rows."""
        chosen = logits.argmax(-1)  # (B,)
        for i, row in enumerate(rows):
            if row.sampling.do_sample:
                scores = row.warpers(None, logits[i:i + 1])
                chosen[i] = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=row.generator)[0, 0]
        return chosen.tolist()
