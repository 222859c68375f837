"""The language model: any local Hugging Face causal-LM directory, or a Llama built from sizes."""

from __future__ import annotations

import torch
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, prepare_padding_mask, sdpa_mask

from bubogpt.config import LLMConfig

# PyTorch's SDPA with a mask built by broadcasting. transformers 4.57 builds SDPA's mask with torch.vmap
# over a Python mask function; on CPU that costs more than the tiny model's whole forward (53 % of a
# batch-8 decode step, measured with cProfile), and serving decodes padded batches at every step.
PADDED_SDPA = "bubogpt_sdpa"


def padded_causal_mask(batch_size: int, cache_position: torch.Tensor, kv_length: int, kv_offset: int = 0,
                       mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                       allow_is_causal_skip: bool = True, **kwargs) -> torch.Tensor | None:
    """The causal + padding mask `sdpa_mask` makes, (B, 1, q, kv) bool (True = attend), or None where
    SDPA's own causal flag does the same (no padding, and a square or one-query step). Any other mask
    pattern goes to transformers' `sdpa_mask`."""
    if mask_function is not causal_mask_function:
        return sdpa_mask(batch_size, cache_position, kv_length, kv_offset, mask_function, attention_mask,
                         allow_is_causal_skip=allow_is_causal_skip, **kwargs)  # fmt: skip
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, kv) or None
    queries = cache_position.shape[0]
    if allow_is_causal_skip and (padding is None or bool(padding.all())) and queries in (1, kv_length):
        return None
    keys = torch.arange(kv_offset, kv_offset + kv_length, device=cache_position.device)
    mask = (keys[None, :] <= cache_position[:, None])[None, None].expand(batch_size, 1, -1, -1)  # (B, 1, q, kv)
    return mask if padding is None else mask & padding[:, None, None, :].bool()


AttentionInterface.register(PADDED_SDPA, sdpa_attention_forward)
AttentionMaskInterface.register(PADDED_SDPA, padded_causal_mask)


def llama_config(config: LLMConfig, vocab_size: int, bos_token_id: int = 1, eos_token_id: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads or config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,  # pad = eos, as in the release
        tie_word_embeddings=False,
    )


def build_llm(config: LLMConfig, vocab_size: int | None = None, dtype: torch.dtype | None = None,
              bos_token_id: int = 1, eos_token_id: int = 2) -> PreTrainedModel:
    """Load `config.path` (local files only), or build a randomly initialised Llama; in `dtype`
    (None: float32). A directory's weights are read straight into that dtype, never as float32
    first: a 7B Vicuna in bfloat16 takes ~13.5 GB, not 27."""
    if config.path:
        return AutoModelForCausalLM.from_pretrained(config.path, dtype=dtype or torch.float32, local_files_only=True,
                                                    attn_implementation=PADDED_SDPA)  # fmt: skip
    llama = llama_config(config, vocab_size or config.vocab_size, bos_token_id, eos_token_id)
    llama._attn_implementation = PADDED_SDPA
    model = LlamaForCausalLM(llama)
    return model.to(dtype) if dtype is not None else model


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
