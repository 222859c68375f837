"""Vision alignment probe: frozen ViT (+ frozen or trainable LLM), vision Q-Former + projection."""
import sys, time, torch, pickle
torch.set_num_threads(2)
from bubogpt.config import tiny, VisionEncoderConfig, LLMConfig
from bubogpt.llm import load_tokenizer
from bubogpt.modeling_bubogpt import BuboGPT
from bubogpt.pretraining.tiny_components import PicturePool, Schedule, encode_pool, train_vision_alignment
vit_path, llm_dir, steps, lr, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
t = time.time()
train, held = pickle.load(open("/tmp/t-tiny-pools.pkl", "rb"))
held_small = held  # 300 pictures x 4 questions
config = tiny()
config.vision = VisionEncoderConfig(img_size=112, patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0, stem_channels=(16, 32, 64))
config.llm.path = llm_dir
config.__post_init__()
model = BuboGPT.build(config, load_tokenizer(llm_dir))
model.vision_encoder.load_state_dict(torch.load(vit_path))
tokens, held_tokens = encode_pool(model.vision_encoder, train), encode_pool(model.vision_encoder, held)
print("encoded", time.time() - t, flush=True)
if mode == "prior":
    from bubogpt.pretraining.tiny_components import init_place_queries
    init_place_queries(model)
model, report = train_vision_alignment(model, tokens, train.scenes, held_tokens, held.scenes, Schedule(steps, lr, 100), 16, 0,
                                       eval_every=int(sys.argv[6]), train_llm=mode == "llm")
print(report.metrics()); print(report.examples[:10]); print("time", time.time() - t)
