"""The language model: any local Hugging Face causal-LM directory, or a Llama built from sizes."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from bubogpt.config import LLMConfig


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
    """Load `config.path` (local files only), or build a randomly initialised Llama."""
    if config.path:
        return AutoModelForCausalLM.from_pretrained(config.path, torch_dtype=dtype, local_files_only=True)
    model = LlamaForCausalLM(llama_config(config, vocab_size or config.vocab_size, bos_token_id, eos_token_id))
    return model.to(dtype) if dtype is not None else model


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
