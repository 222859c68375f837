"""The prompt budget: how many tokens a conversation takes, checked before any work is done.

The ingress checks it when a request arrives (so an over-long prompt is refused before the media are
encoded or a batch is joined), and the LLM deployment checks it again with its own tokenizer. Both
count the same way: BOS + text tokens + the query tokens of each modality slot (serve/generation.py).
"""

from __future__ import annotations

from pathlib import Path

from bubogpt.checkpoints.native import read_config
from bubogpt.config import BuboGPTConfig
from bubogpt.llm import load_tokenizer

from serve.generation import check_prompt_budget, count_prompt_tokens, query_token_counts
from serve.protocol import ChatRequest


class PromptBudget:
    def __init__(self, config: BuboGPTConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.query_tokens = query_token_counts(config)

    @classmethod
    def of_model_dir(cls, model_dir: str) -> "PromptBudget":
        """The model's config and tokenizer only (the ingress loads no weights)."""
        config = BuboGPTConfig.from_dict(read_config(model_dir))
        return cls(config, load_tokenizer(config.llm.path or str(Path(model_dir) / "llm")))

    def count(self, chat: ChatRequest) -> int:
        return count_prompt_tokens(self.tokenizer, self.query_tokens, chat.conversation().render())

    def check(self, chat: ChatRequest, max_prompt_tokens: int) -> int:
        """The prompt's tokens; raises PromptTooLongError past `max_prompt_tokens` or the context."""
        tokens = self.count(chat)
        check_prompt_budget(tokens, chat.max_new_tokens, max_prompt_tokens, self.config.max_context_tokens)
        return tokens
