"""GPU check: the 7b-architecture BuboGPT with random bf16 weights on one GPU.

Measures, on one device, in one run:
  1. device copy bandwidth (bytes read + written per second);
  2. encoder + joiner latency per image and per audio input;
  3. LLM decode tokens/s at batch 1, 8, 32 with the KV cache -- Hugging Face eager decoding, and the
     serving engine's decode loop (bubogpt/generation.py: a slotted static KV cache, CUDA graphs on a
     GPU) on the same weights -- and at batch 1 through the LLM deployment's own code path (a request
     submitted to serve/generation.py's GenerationWorker, its text streamed back), next to the
     memory-bandwidth bound (batch x copy bandwidth / weight bytes);
  4. Grounding DINO Swin-T (groundingdino-py) + SAM ViT-H (segment-anything) latency per 800-px image;
  5. a few stage-2 training steps (samples/s, peak memory).

    python benchmarks/gpu.py                  # on a GPU machine; installs nothing, < 8 minutes
    python benchmarks/gpu.py --device cpu     # smoke: the same code paths on the CPU, tiny preset
                                              # (--smoke is the same)

Random weights measure speed only. Nothing is downloaded: BERT for Grounding DINO is a random
bert-base built from its config in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bubogpt.config import bubogpt_7b, tiny  # noqa: E402
from bubogpt.conversation import Conversation, instruction_prompt  # noqa: E402
from bubogpt.generation import ContinuousBatcher, Sampling, SlotDecoder  # noqa: E402
from bubogpt.modeling_bubogpt import BuboGPT  # noqa: E402

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


# -- 3. decode: Hugging Face eager, the serving engine's slot decoder, and the deployment's worker -----

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


def slot_decode_rate(decoder: SlotDecoder, batch, prompt_len, new_tokens, device, vocab) -> float:
    """Tokens/s of the serving engine's decode loop (bubogpt/generation.py: ContinuousBatcher over the
    SlotDecoder, CUDA graphs on a GPU; prefill excluded): `batch` greedy rows decoding together,
    including the per-step host work (token choice, bookkeeping) the worker does."""
    embed = decoder.llm.model.embed_tokens
    greedy = Sampling(False, 1.0, 1.0)

    def run():
        batcher = ContinuousBatcher(decoder, eos_token_id=None)
        with torch.no_grad():
            for row in range(batch):
                batcher.add(row, embed(torch.randint(3, vocab, (prompt_len,), device=device)), new_tokens + 1, greedy)
        sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            batcher.step()
        sync(device)
        return time.perf_counter() - start

    run()  # captures this shape's graphs
    seconds = sorted(run() for _ in range(3))[1]
    return batch * new_tokens / seconds


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer covering every id of the LLM's vocabulary (w3, w4, ...), so any token a
    random model writes decodes to text as the worker needs; BOS 1, EOS 2 as Vicuna's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")  # fmt: skip


def worker_decode_rate(model: BuboGPT, max_rows: int, prompt_words: int, new_tokens: int, device) -> tuple[float, int]:
    """Batch-1 decode through the LLM deployment's own code path: a GenerationJob submitted alone to
    serve/generation.py's GenerationWorker (as serve/app.py's `_generate_rows` does), streamed back
    as text. Tokens/s excluding prefill: (tokens(N) - 1) / (time(N tokens) - time(1 token))."""
    import threading

    from serve.generation import GenerationJob, GenerationWorker

    worker = GenerationWorker(model, max_rows)
    if worker.engine != "continuous":
        raise RuntimeError(f"the worker runs the {worker.engine!r} engine, not the slot decoder")
    conversation = Conversation()
    conversation.add_user(" ".join(f"w{3 + i}" for i in range(prompt_words)))
    prompt = conversation.render()

    def one(limit: int) -> tuple[float, int]:
        done, final = threading.Event(), {}

        def deliver(item):
            if item is None:
                done.set()
            elif isinstance(item, BaseException):
                final["error"] = item
            elif item[0] is not None and item[0].done:
                final["tokens"] = item[0].completion_tokens
        start = time.perf_counter()
        worker.submit([GenerationJob(prompt, 0, limit, Sampling(False, 1.0, 1.0))], deliver)
        done.wait(600)
        if "error" in final:
            raise final["error"]
        return time.perf_counter() - start, final["tokens"]

    for _ in range(2):  # warm-up: graph capture for the shapes a batch-1 row passes through
        one(new_tokens)
    first = sorted(one(1)[0] for _ in range(5))[2]
    runs = sorted(one(new_tokens) for _ in range(3))
    seconds, tokens = runs[1]
    worker.stop(60)
    return (tokens - 1) / (seconds - first), tokens


def check_decoder_matches_hf(device) -> None:
    """The serving engine's decoder (graph-captured on a GPU, batches rounded up as it runs them
    there) gives Hugging Face's greedy tokens: a tiny fp32 Llama with GQA, rows joining at
    different steps with different prompt lengths."""
    from bubogpt.config import LLMConfig
    from bubogpt.llm import build_llm

    with torch.device(device):
        llm = build_llm(LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=128, vocab_size=300)).eval()
    prompts = [torch.randint(3, 300, (n,), device=device) for n in (7, 3, 12)]
    with torch.no_grad():
        reference = [llm.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=8,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
                     for ids in prompts]  # fmt: skip
    decoder = SlotDecoder(llm, slots=4, max_len=32)
    decoder.round_batches = True
    batcher = ContinuousBatcher(decoder, eos_token_id=None)
    ours = {i: [] for i in range(3)}
    for step in range(12):
        if step in (0, 2, 3):
            i = (0, 2, 3).index(step)
            with torch.no_grad():
                ours[i].append(batcher.add(i, llm.model.embed_tokens(prompts[i]), 8, Sampling(False, 1.0, 1.0))[0])
        for key, token, _ in batcher.step():
            ours[key].append(token)
    if [ours[i] for i in range(3)] != reference:
        raise AssertionError(f"slot decoder tokens {ours} != HF greedy {reference}")
    graphs = f", {len(decoder.graphs)} CUDA graphs" if decoder.cuda_graphs else ""
    row("decode", f"slot decoder == HF greedy (tiny fp32 Llama, GQA, rows joining{graphs})", "yes")


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
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cpu: the smoke run, tiny preset on the CPU (checks the code paths)")
    parser.add_argument("--smoke", action="store_true", help="the same as --device cpu")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    parser.add_argument("--skip-grounding", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke or args.device == "cpu"
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not smoke:
        print("no GPU found: run with --device cpu for the smoke run", file=sys.stderr)
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
    if smoke:
        config.llm.vocab_size = 300
    tokenizer = word_tokenizer(config.llm.vocab_size)
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
    batches = (1, 8, 32)
    rates = {}
    for batch in batches:
        rates[batch] = guarded("decode", hf_eager_decode_rate, model.llm, batch, prompt_len, new_tokens, device, vocab)
    decoder = SlotDecoder(model.llm, slots=max(batches), max_len=prompt_len + new_tokens + 8)
    for batch in batches:
        bound = batch * bandwidth / llm_bytes
        row("decode", f"batch {batch}: bandwidth bound", f"{bound:.0f} tokens/s")
        if rates[batch]:
            row("decode", f"batch {batch}: HF eager (KV cache)", f"{rates[batch]:.0f} tokens/s ({rates[batch] / bound:.0%} of bound)")
        slots = guarded("decode", slot_decode_rate, decoder, batch, prompt_len, new_tokens, device, vocab)
        if slots:
            kind = "CUDA graphs" if decoder.cuda_graphs else "eager"
            row("decode", f"batch {batch}: serving engine, slot KV cache ({kind})", f"{slots:.0f} tokens/s ({slots / bound:.0%} of bound)")
    del decoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The product's path at batch 1: the worker the LLM deployment runs, its cache as the deployment
    # sizes it (llm_max_batch_size rows x the model's context).
    measured = guarded("decode", worker_decode_rate, model, 8, prompt_len, 2 * new_tokens, device)
    if measured:
        rate, tokens = measured
        bound = bandwidth / llm_bytes
        row("decode", f"batch 1: LLM deployment's GenerationWorker ({tokens} tokens, text streamed)",
            f"{rate:.0f} tokens/s ({rate / bound:.0%} of bound)")
    if device.type == "cuda":
        torch.cuda.empty_cache()

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
    print(f"\nreproduce: python benchmarks/gpu.py{' --device cpu' if smoke else ''}")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("section", "measurement", "value"), r)) for r in ROWS], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
