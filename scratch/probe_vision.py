import sys, time, torch, pickle, os
torch.set_num_threads(2)
from bubogpt.config import VisionEncoderConfig
from bubogpt.pretraining.tiny_components import PicturePool, Schedule, train_vision_encoder
t = time.time()
cache = "/tmp/t-tiny-pools.pkl"
if os.path.exists(cache):
    train, held = pickle.load(open(cache, "rb"))
else:
    train = PicturePool(0, "vision_train", int(sys.argv[1]), 112, 14)
    held = PicturePool(0, "vision_held_out", 300, 112, 14)
    pickle.dump((train, held), open(cache, "wb"))
print("pools", time.time() - t, flush=True)
variant = sys.argv[2]
steps = int(sys.argv[3])
cfg = dict(img_size=112, patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0)
if variant == "conv":
    cfg["stem_channels"] = (16, 32, 64)
enc, scores = train_vision_encoder(VisionEncoderConfig(**cfg), train, held, Schedule(steps, float(sys.argv[4]), 100), 32, 0, eval_every=200)
print(variant, scores, "params", sum(p.numel() for p in enc.parameters()), "time", time.time() - t)
torch.save(enc.state_dict(), f"/tmp/t-tiny-vit-{variant}-{steps}.pt")
