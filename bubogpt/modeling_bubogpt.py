"""BuboGPT: frozen audio/image encoders -> per-modality Q-Former + projection -> frozen causal LM.

Forward pass, as numbered steps:
  1. encode each modality that is present (or take precomputed frozen-encoder tokens);
  2. join: Q-Former + projection -> (n, Q, llm_hidden) per modality;
  3. assemble each row: [BOS] + prompt text and modality slots (+ target + end_sym when training),
     then pad whole rows (right for training, left for generation) -- never in the middle;
  4. the language model: loss on the target only, or `generate` with a per-row stop string.

Precision: the frozen parts (LLM, audio and vision encoders) live in `frozen_dtype(config)` (bfloat16
on a GPU for 7b/13b, where the reference ran its LLM in fp16/8-bit and EVA in fp16); the joiner, which
trains, stays float32. Encoder inputs are cast to the encoder's dtype, encoder tokens to the joiner's,
and the joiner's output to the LLM's embedding dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from bubogpt.config import BuboGPTConfig
from bubogpt.conversation import ModalitySlot, Segment, merge_text, prompt_modalities
from bubogpt.llm import build_llm
from bubogpt.modeling_audio import ImageBindAudioEncoder
from bubogpt.modeling_qformer import MultimodalJoiner
from bubogpt.modeling_vision import EvaVisionEncoder

IGNORE_INDEX = -100


class PromptTooLongError(ValueError):
    """The assembled prompt does not fit the context budget."""


@dataclass
class BuboGPTOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T, vocab)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX outside the targets


@dataclass
class AssembledBatch:
    inputs_embeds: torch.Tensor  # (B, T, llm_hidden)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def frozen_dtype(config: BuboGPTConfig, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype of the frozen LLM and encoders: `config.frozen_dtype`, where "auto" is bfloat16 on
    a CUDA device (default: when one is available) and float32 on the CPU."""
    if config.frozen_dtype != "auto":
        return DTYPES[config.frozen_dtype]
    on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return torch.bfloat16 if on_gpu else torch.float32


class BuboGPT(nn.Module):
    def __init__(self, config: BuboGPTConfig, llm: PreTrainedModel, tokenizer=None):
        super().__init__()
        self.config = config
        self.audio_encoder = ImageBindAudioEncoder(config.audio)
        self.vision_encoder = EvaVisionEncoder(config.vision)
        llm_hidden = llm.get_input_embeddings().embedding_dim
        if llm_hidden != config.llm.hidden_size:
            raise ValueError(
                f"the language model's hidden size is {llm_hidden}, the config says {config.llm.hidden_size}"
            )
        self.joiner = MultimodalJoiner(config.audio_qformer, config.vision_qformer, llm_hidden)
        self.llm = llm
        self.tokenizer = tokenizer

    @classmethod
    def build(cls, config: BuboGPTConfig, tokenizer=None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> "BuboGPT":
        """Randomly initialised encoders and joiner; the LLM from `config.llm` (path or sizes).

        The LLM and the encoders are built in `dtype` (default: `frozen_dtype(config, device)`), the
        joiner in float32."""
        vocab = len(tokenizer) if tokenizer is not None else None
        bos = tokenizer.bos_token_id if tokenizer is not None else 1
        eos = tokenizer.eos_token_id if tokenizer is not None else 2
        if vocab is not None and not config.llm.path:
            config.llm.vocab_size = vocab
        dtype = dtype or frozen_dtype(config, device)
        llm = build_llm(config.llm, vocab, dtype=dtype, bos_token_id=bos, eos_token_id=eos)
        model = cls(config, llm, tokenizer)
        model.audio_encoder.to(dtype)
        model.vision_encoder.to(dtype)
        return model

    # -- 1. + 2. modalities -> LLM embeddings ------------------------------------------------------

    def num_query_tokens(self, modality: str) -> int:
        return self.joiner.qformers[modality].config.num_query_token

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """(n, clips, 1, mels, frames) -> frozen audio tokens (n, 1 + patches, audio_width)."""
        return self.audio_encoder(fbank.to(self.audio_encoder.patch_embed.weight.dtype))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> frozen vision tokens (n, 1 + patches, vision_width)."""
        return self.vision_encoder(pixel_values.to(self.vision_encoder.cls_token.dtype))

    def join(self, modality: str, encoder_tokens: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (in whatever dtype the encoder gave) -> (n, Q, llm_hidden) in the joiner's."""
        weight = self.joiner.projections[modality].fc.weight
        return self.joiner(modality, encoder_tokens.to(device=weight.device, dtype=weight.dtype))

    def embed_modalities(
        self,
        audio: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        vision_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Raw inputs or precomputed encoder tokens -> {modality: (n, Q, llm_hidden)}."""
        if audio is not None and audio_tokens is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self._trains(self.audio_encoder)):
                audio_tokens = self.encode_audio(audio)
        if image is not None and vision_tokens is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self._trains(self.vision_encoder)):
                vision_tokens = self.encode_image(image)
        embeds = {}
        if audio_tokens is not None:
            embeds["audio"] = self.join("audio", audio_tokens)
        if vision_tokens is not None:
            embeds["vision"] = self.join("vision", vision_tokens)
        return embeds

    @staticmethod
    def _trains(module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    # -- 3. assembly -------------------------------------------------------------------------------

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def assemble(
        self,
        prompts: list[list[Segment]],
        modality_embeds: dict[str, torch.Tensor],
        targets: list[str] | None = None,
        padding_side: str = "right",
        end_sym: str | None = None,
    ) -> AssembledBatch:
        """Build padded LLM inputs. `modality_embeds[m]` has one row per prompt holding an `m` slot,
        in prompt order; each prompt's set of slots must equal the set of modalities given for it.
        Targets end with `end_sym` (default `config.end_sym`; stage 1 passes `config.stage1_end_sym`)."""
        end_sym = self.config.end_sym if end_sym is None else end_sym
        if self.tokenizer is None:
            raise ValueError("BuboGPT needs a tokenizer to assemble prompts")
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        embedding = self.llm.get_input_embeddings()
        device, dtype = embedding.weight.device, embedding.weight.dtype
        self._check_slot_counts(prompts, modality_embeds)
        next_row = {m: 0 for m in modality_embeds}
        rows, labels = [], []
        for i, prompt in enumerate(prompts):
            pieces = [torch.tensor([self.tokenizer.bos_token_id])]
            row_labels = [IGNORE_INDEX]
            for segment in merge_text(prompt):
                if isinstance(segment, ModalitySlot):
                    tokens = modality_embeds[segment.modality][next_row[segment.modality]]  # (Q, H)
                    next_row[segment.modality] += 1
                    pieces.append(tokens.to(device=device, dtype=dtype))
                    row_labels += [IGNORE_INDEX] * tokens.shape[0]
                else:
                    ids = self._text_ids(segment)
                    pieces.append(torch.tensor(ids, dtype=torch.long))
                    row_labels += [IGNORE_INDEX] * len(ids)
            if targets is not None:
                target_ids = self._text_ids(targets[i] + end_sym)[: self.config.max_txt_len]
                pieces.append(torch.tensor(target_ids, dtype=torch.long))
                row_labels += target_ids
            rows.append(torch.cat([self._embed_piece(p, embedding, device) for p in pieces]))
            labels.append(torch.tensor(row_labels, dtype=torch.long))
        return self._pad(rows, labels, padding_side, device)

    def prompt_embeddings(self, prompt: list[Segment], audio_tokens: torch.Tensor | None = None,
                          vision_tokens: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One generation prompt, assembled alone (no padding) from precomputed encoder tokens -> (T, llm_hidden)."""
        embeds = self.embed_modalities(audio_tokens=audio_tokens, vision_tokens=vision_tokens)
        return self.assemble([prompt], embeds, padding_side="left").inputs_embeds[0]

    @staticmethod
    def _embed_piece(piece: torch.Tensor, embedding: nn.Embedding, device) -> torch.Tensor:
        if piece.dtype == torch.long:
            return embedding(piece.to(device))
        return piece

    @staticmethod
    def _check_slot_counts(prompts: list[list[Segment]], modality_embeds: dict[str, torch.Tensor]) -> None:
        for i, prompt in enumerate(prompts):
            slots = prompt_modalities(prompt)
            if len(slots) != len(set(slots)):
                raise ValueError(f"prompt {i} has more than one slot for one modality: {slots}")
        for modality in ("audio", "vision"):
            wanted = sum(modality in prompt_modalities(p) for p in prompts)
            given = modality_embeds[modality].shape[0] if modality in modality_embeds else 0
            if wanted != given:
                raise ValueError(
                    f"{wanted} prompt(s) have a {modality} slot but {given} {modality} input(s) were given"
                )

    def _pad(self, rows: list[torch.Tensor], labels: list[torch.Tensor], side: str, device) -> AssembledBatch:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        length = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), length, hidden)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        padded_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)
        for i, (row, row_labels) in enumerate(zip(rows, labels)):
            n = row.shape[0]
            span = slice(0, n) if side == "right" else slice(length - n, length)
            embeds[i, span] = row
            mask[i, span] = 1
            padded_labels[i, span] = row_labels.to(device)
        return AssembledBatch(embeds, mask, padded_labels)

    # -- 4. language model -------------------------------------------------------------------------

    def forward(
        self,
        prompts: list[list[Segment]],
        targets: list[str],
        audio: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        vision_tokens: torch.Tensor | None = None,
        end_sym: str | None = None,
    ) -> BuboGPTOutput:
        """Training forward: cross-entropy on target + end_sym tokens only (`end_sym`: see `assemble`)."""
        embeds = self.embed_modalities(audio, image, audio_tokens, vision_tokens)
        batch = self.assemble(prompts, embeds, targets, padding_side="right", end_sym=end_sym)
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, labels=batch.labels)
        return BuboGPTOutput(loss=out.loss, logits=out.logits, labels=batch.labels)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[Segment]],
        audio: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        vision_tokens: torch.Tensor | None = None,
        max_new_tokens: int = 300,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        num_beams: int = 1,
        streamer=None,
        seed: int | None = None,
    ) -> list[str]:
        """Batched generation; each row stops at its own `end_sym`. Returns the answers' text."""
        embeds = self.embed_modalities(audio, image, audio_tokens, vision_tokens)
        batch = self.assemble(prompts, embeds, padding_side="left")
        prompt_len = batch.inputs_embeds.shape[1]
        budget = self.config.max_context_tokens
        if prompt_len + max_new_tokens > budget:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"context budget of {budget} tokens"
            )
        if seed is not None:
            torch.manual_seed(seed)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        output = self.llm.generate(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_beams=num_beams,
            stop_strings=[self.config.end_sym],
            tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
        )
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [clean_answer(t, self.config.end_sym) for t in texts]

    # -- what trains -------------------------------------------------------------------------------

    def set_trainable(self, stage: str, train_qformers: bool = False) -> list[str]:
        """Freeze everything, then unfreeze what `stage` trains. Returns the trainable names.

        stage1: the audio Q-Former and audio projection (audio alignment).
        stage2: both projections (+ both Q-Formers with `train_qformers`).
        """
        prefixes = {
            "stage1": ("joiner.qformers.audio.", "joiner.projections.audio."),
            "stage2": ("joiner.projections.",),
        }
        if stage not in prefixes:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(prefixes)}")
        wanted = prefixes[stage] + (("joiner.qformers.",) if train_qformers else ())
        names = []
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name.startswith(wanted))
            if parameter.requires_grad:
                names.append(name)
        return names


def clean_answer(text: str, end_sym: str) -> str:
    """Cut at the first stop string and drop a leading role tag the model may repeat."""
    text = text.split(end_sym)[0]
    text = text.split("Assistant:")[-1] if text.lstrip().startswith("Assistant:") else text
    return text.strip()
