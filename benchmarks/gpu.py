"""GPU check: the 7b-architecture BuboGPT with random bf16 weights on one GPU.

Measures, on one device, in one run:
  1. device copy bandwidth (bytes read + written per second);
  2. encoder + joiner latency per image and per audio input;
  3. LLM decode tokens/s at batch 1, 8, 32 with the KV cache -- Hugging Face eager decoding (what the
     serving path runs) and a CUDA-graph decode step over a static KV cache using the same weights --
     next to the memory-bandwidth bound (batch x copy bandwidth / weight bytes);
  4. Grounding DINO Swin-T (groundingdino-py) + SAM ViT-H (segment-anything) latency per 800-px image;
  5. a few stage-2 training steps (samples/s, peak memory).

    python benchmarks/gpu.py                  # on a GPU machine; installs nothing, < 8 minutes
    python benchmarks/gpu.py --smoke          # the same code paths on the CPU with the tiny preset

Random weights measure speed only. Nothing is downloaded: BERT for Grounding DINO is a random
bert-base built from its config in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bubogpt.config import bubogpt_7b, tiny  # noqa: E402
from bubogpt.conversation import instruction_prompt  # noqa: E402
from bubogpt.modeling_bubogpt import BuboGPT  # noqa: E402
from bubogpt.tokenizer import build_tiny_tokenizer  # noqa: E402

ROWS: list[tuple[str, str, str]] = []  # (section, measurement, value)


def row(section: str, name: str, value: str) -> None:
    ROWS.append((section, name, value))
    print(f"[{section}] {name}: {value}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int = 2, reps: int = 5) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# -- 1. bandwidth ----------------------------------------------------------------------------------

def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, warmup=3, reps=10)
    del src, dst
    return 2 * nbytes / seconds


# -- 2. encoders + joiner --------------------------------------------------------------------------

def encoder_latency(model, config, device, dtype) -> None:
    with torch.no_grad():
        for batch in (1, 8):
            image = torch.randn(batch, 3, config.vision.img_size, config.vision.img_size, device=device, dtype=dtype)
            audio = torch.randn(batch, config.audio_clips, 1, 128, 204, device=device, dtype=dtype)
            img_s = timed(lambda: model.embed_modalities(image=image), device)
            aud_s = timed(lambda: model.embed_modalities(audio=audio), device)
            row("encoders", f"image -> EVA ViT-g -> Q-Former -> projection, batch {batch}", f"{img_s / batch * 1000:.1f} ms per image")
            row("encoders", f"audio ({config.audio_clips} clips) -> ImageBind -> Q-Former -> projection, batch {batch}", f"{aud_s / batch * 1000:.1f} ms per audio")


# -- 3. a CUDA-graph decode step over a static KV cache, reading the HF Llama's own weights ------------

class StaticLlamaDecoder:
    """Greedy single-token decode for a `LlamaForCausalLM` with a preallocated KV cache.

    Written out (nanoGPT / gpt-fast style) so that one step has no host synchronisation and can be
    captured in a CUDA graph, with few kernels per layer: q/k/v and gate/up weights are fused into one
    matrix each, rotary embedding is a complex multiply (q/k rows permuted to interleaved pairs, which
    leaves q.k unchanged), residual adds ride on `addmm`, and one `index_copy_` writes k and v. It
    reads the Hugging Face module's weights; `check_decoder_matches_hf` checks its tokens equal Hugging
    Face greedy decoding.
    """

    def __init__(self, llm, batch: int, max_len: int):
        self.llm, self.batch, self.max_len = llm, batch, max_len
        cfg = llm.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        w = llm.model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        # half-split rotary layout -> interleaved pairs, applied to the rows of q and k projections
        hd = self.head_dim
        interleave = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], dim=1).flatten()

        def permute(weight, heads):
            return weight.view(heads, hd, -1)[:, interleave.to(weight.device)].reshape(heads * hd, -1)

        self.layers = []
        with torch.no_grad():
            for layer in llm.model.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append({
                    "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
                    "wqkv": torch.cat([permute(a.q_proj.weight, self.n_heads), permute(a.k_proj.weight, self.n_kv),
                                       a.v_proj.weight]).contiguous(),
                    "wo": a.o_proj.weight, "w_gate_up": torch.cat([m.gate_proj.weight, m.up_proj.weight]).contiguous(),
                    "w_down": m.down_proj.weight,
                })
        # cache per layer: (B, 2 * n_kv, L, hd) -- keys then values, written by one index_copy_
        self.cache = torch.zeros(cfg.num_hidden_layers, batch, 2 * self.n_kv, max_len, hd, device=self.device, dtype=self.dtype)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=self.device).float() / hd))
        angles = torch.outer(torch.arange(max_len, device=self.device).float(), inv_freq)
        self.freqs = torch.polar(torch.ones_like(angles), angles)  # (L, hd/2) complex64
        self.key_positions = torch.arange(max_len, device=self.device)
        self.position = torch.zeros((), dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.graph = None

    def _rope(self, x, freqs):
        """x: (B, T, H, hd) interleaved pairs; freqs: (T, hd/2) complex."""
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs[:, None]).flatten(-2).to(x.dtype)

    def _forward(self, input_ids, positions):
        B, T = input_ids.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.llm.model.embed_tokens(input_ids).view(B * T, -1)  # (B*T, D)
        freqs = self.freqs[positions]  # (T, hd/2), shared by every layer
        visible = self.key_positions[None, :] <= positions[:, None]  # (T, L)
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), w["ln1"], self.eps)
            qkv = (h @ w["wqkv"].t()).view(B, T, nh + 2 * nkv, hd)
            qk = self._rope(qkv[:, :, : nh + nkv], freqs)
            q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hd)
            new_kv = torch.cat([qk[:, :, nh:], qkv[:, :, nh + nkv:]], dim=2).transpose(1, 2)  # (B, 2nkv, T, hd)
            self.cache[i].index_copy_(2, positions, new_kv)
            keys, values = self.cache[i, :, :nkv], self.cache[i, :, nkv:]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=nkv != nh)
            x = torch.addmm(x, out.transpose(1, 2).reshape(B * T, -1), w["wo"].t())
            h = F.rms_norm(x, (x.shape[-1],), w["ln2"], self.eps)
            gate, up = (h @ w["w_gate_up"].t()).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w["w_down"].t())
        x = x.view(B, T, -1)[:, -1]
        x = F.rms_norm(x, (x.shape[-1],), self.llm.model.norm.weight, self.eps)
        return x @ self.llm.lm_head.weight.t()  # (B, vocab)

    @torch.no_grad()
    def prefill(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=self.device)
        logits = self._forward(input_ids, positions)
        self.tokens.copy_(logits.argmax(-1))
        self.position.fill_(input_ids.shape[1])

    @torch.no_grad()
    def _step(self):
        logits = self._forward(self.tokens[:, None], self.position.view(1))
        self.tokens.copy_(logits.argmax(-1))
        self.position.add_(1)

    def capture(self):
        """Record one step in a CUDA graph (warm-up on a side stream first, as PyTorch requires)."""
        saved = (self.cache.clone(), self.tokens.clone(), self.position.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.cache.copy_(saved[0])
        self.tokens.copy_(saved[1])
        self.position.copy_(saved[2])
        del saved

    def step(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


def hf_eager_decode_rate(llm, batch, prompt_len, new_tokens, device, vocab) -> float:
    """Tokens/s of Hugging Face's own cached decoding (prefill excluded)."""
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    with torch.no_grad():
        def run():
            out = llm(input_ids=ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = llm(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            return time.perf_counter() - start
        run()
        seconds = sorted(run() for _ in range(3))[1]
    return batch * new_tokens / seconds


def graph_decode_rate(llm, batch, prompt_len, new_tokens, device, vocab) -> float:
    decoder = StaticLlamaDecoder(llm, batch, prompt_len + new_tokens + 8)
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    decoder.prefill(ids)
    if device.type == "cuda":
        decoder.capture()

    def run():
        decoder.prefill(ids)
        sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            decoder.step()
        sync(device)
        return time.perf_counter() - start

    run()
    seconds = sorted(run() for _ in range(3))[1]
    del decoder
    return batch * new_tokens / seconds


def check_decoder_matches_hf(device) -> None:
    """The static decoder (graph-captured on a GPU) gives Hugging Face's greedy tokens: a tiny fp32 Llama."""
    from bubogpt.config import LLMConfig
    from bubogpt.llm import build_llm

    with torch.device(device):
        llm = build_llm(LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=128, vocab_size=300)).eval()
    ids = torch.randint(3, 300, (2, 7), device=device)
    with torch.no_grad():
        reference = llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)[:, 7:]
    decoder = StaticLlamaDecoder(llm, 2, 20)
    decoder.prefill(ids)
    if device.type == "cuda":
        decoder.capture()
    tokens = [decoder.tokens.clone()]
    for _ in range(5):
        decoder.step()
        tokens.append(decoder.tokens.clone())
    ours = torch.stack(tokens, dim=1)
    if not torch.equal(ours, reference):
        raise AssertionError(f"static decoder tokens {ours.tolist()} != HF greedy {reference.tolist()}")
    row("decode", "static decoder == HF greedy (tiny fp32 Llama, GQA)", "yes")


# -- 4. grounding ------------------------------------------------------------------------------------

def grounding_latency(device: torch.device, sam_variant: str, image_hw: tuple[int, int], reps: int) -> None:
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig
    from segment_anything import SamPredictor, sam_model_registry
    from transformers import BertConfig, BertModel, BertTokenizer
    import groundingdino

    with tempfile.TemporaryDirectory() as bert_dir:
        # A random bert-base with BERT's special-token ids, so the phrase splitting works.
        vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = ["circle", "square", "triangle", "star", "dog", "cat", "car", "tree", "person", "red", "blue"]
        vocab += [f"[unused{i}]" for i in range(99, 99 + 1012 - len(vocab))] + ["."] + words
        vocab += [f"w{i}" for i in range(30522 - len(vocab))]
        Path(bert_dir, "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizer(str(Path(bert_dir, "vocab.txt"))).save_pretrained(bert_dir)
        BertModel(BertConfig()).save_pretrained(bert_dir)
        config_file = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
        args = SLConfig.fromfile(str(config_file))
        args.text_encoder_type = bert_dir
        args.device = device.type
        with torch.device(device):  # initialise the random weights on the device: faster
            detector = build_model(args).to(device).eval()
    with torch.device(device):
        sam = sam_model_registry[sam_variant]().to(device).eval()
    predictor = SamPredictor(sam)
    h, w = image_hw
    mean = torch.tensor([0.485, 0.456, 0.406], device=device)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=device)[:, None, None]
    image = torch.rand(3, h, w, device=device)
    caption = "circle . square . triangle . star . dog . cat . car . tree ."
    image_np = (image.permute(1, 2, 0).cpu().numpy() * 255).astype("uint8")
    boxes = torch.tensor([[10, 10, 200, 200], [300, 100, 500, 400], [50, 300, 250, 600]], device=device, dtype=torch.float)

    @torch.no_grad()
    def detect():
        out = detector(((image - mean) / std)[None], captions=[caption])
        return out["pred_boxes"]

    @torch.no_grad()
    def segment():
        predictor.set_image(image_np)  # one image embedding, reused for every box
        transformed = predictor.transform.apply_boxes_torch(boxes, image_np.shape[:2])
        predictor.predict_torch(point_coords=None, point_labels=None, boxes=transformed, multimask_output=False)

    detect_s = timed(detect, device, warmup=1, reps=reps)
    segment_s = timed(segment, device, warmup=1, reps=reps)
    row("grounding", f"Grounding DINO Swin-T, {w}x{h} image, fp32", f"{detect_s * 1000:.1f} ms")
    row("grounding", f"SAM {sam_variant}: embedding + 3 boxes, fp32", f"{segment_s * 1000:.1f} ms")
    # No tagger (RAM) here: not comparable with the reference's end-to-end grounding time per image.
    row("grounding", "detector + segmenter per image (no tagger)", f"{(detect_s + segment_s) * 1000:.1f} ms")
    del detector, sam, predictor


# -- 5. training -------------------------------------------------------------------------------------

def training_steps(model: BuboGPT, device, batch: int, steps: int) -> None:
    model.set_trainable("stage2")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-5, weight_decay=0.05)
    size = model.config.vision.img_size
    images = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompts = [instruction_prompt(["vision"], "Describe this image in detail, naming every object and its colour.")] * batch
    targets = ["A red circle on the left, a blue square at the top and a green star at the bottom right of the picture."] * batch
    model.train()

    def step():
        loss = model(prompts, targets, image=images).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, warmup=1, reps=steps)
    row("training", f"stage-2 step, batch {batch} (image + text)", f"{batch / seconds:.1f} samples/s ({seconds * 1000:.0f} ms/step)")
    if device.type == "cuda":
        row("training", "peak GPU memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    model.eval()


def guarded(section: str, fn, *args, **kwargs):
    """Run one section; a failure is reported in the table and the run goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # a benchmark run on a lent machine must not lose the other sections
        import traceback

        traceback.print_exc()
        row(section, "error", f"{type(exc).__name__}: {str(exc)[:200]}")
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU (checks the code paths)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    parser.add_argument("--skip-grounding", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not smoke:
        print("no GPU found: run with --smoke on the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    row("machine", "device", f"{name}; torch {torch.__version__}")

    bandwidth = copy_bandwidth(device, (2 << 30) if not smoke else (64 << 20))
    row("bandwidth", "device copy (read + write)", f"{bandwidth / 1e12:.2f} TB/s")

    config = tiny() if smoke else bubogpt_7b()
    dtype = torch.float32 if smoke else torch.bfloat16
    tokenizer = build_tiny_tokenizer(["###Human: Describe this image in detail ###Assistant: a red circle###"] * 4, 300)
    if smoke:
        config.llm.vocab_size = len(tokenizer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = BuboGPT.build(config)  # random weights, 32000-token vocabulary for 7b
    torch.set_default_dtype(previous)
    model.tokenizer = tokenizer
    model.eval()
    vocab = model.llm.config.vocab_size
    llm_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    row("model", "preset / dtype", f"{config.preset} / {dtype}")
    row("model", "LLM weight bytes", f"{llm_bytes / 1e9:.2f} GB")

    guarded("encoders", encoder_latency, model, config, device, dtype)

    # 3. decode
    guarded("decode", check_decoder_matches_hf, device)
    prompt_len, new_tokens = (64, 64) if not smoke else (8, 8)
    for batch in (1, 8, 32):
        bound = batch * bandwidth / llm_bytes
        row("decode", f"batch {batch}: bandwidth bound", f"{bound:.0f} tokens/s")
        eager = guarded("decode", hf_eager_decode_rate, model.llm, batch, prompt_len, new_tokens, device, vocab)
        if eager:
            row("decode", f"batch {batch}: HF eager (KV cache)", f"{eager:.0f} tokens/s ({eager / bound:.0%} of bound)")
        graph = guarded("decode", graph_decode_rate, model.llm, batch, prompt_len, new_tokens, device, vocab)
        if graph:
            row("decode", f"batch {batch}: CUDA-graph static KV cache", f"{graph:.0f} tokens/s ({graph / bound:.0%} of bound)")

    # 5. training (before grounding so the LLM's memory is measured alone)
    guarded("training", training_steps, model, device, batch=12 if not smoke else 2, steps=5 if not smoke else 1)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. grounding
    if not args.skip_grounding:
        guarded("grounding", grounding_latency, device, "vit_h" if not smoke else "vit_b",
                (800, 1066) if not smoke else (400, 533), reps=5 if not smoke else 1)

    row("machine", "wall time of this run", f"{time.perf_counter() - started:.0f} s")
    print("\n| section | measurement | value |\n|---|---|---|")
    for section, measurement, value in ROWS:
        print(f"| {section} | {measurement} | {value} |")
    print(f"\nreproduce: python benchmarks/gpu.py{' --smoke' if smoke else ''}")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("section", "measurement", "value"), r)) for r in ROWS], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
