import sys, time, torch, pickle, os
torch.set_num_threads(2)
from bubogpt.config import AudioEncoderConfig
from bubogpt.preprocess import AudioPreprocessConfig
from bubogpt.pretraining.tiny_components import RecordingPool, Schedule, train_audio_encoder
t = time.time()
cache = "/tmp/t-tiny-audio-pools.pkl"
cfg = AudioPreprocessConfig(num_clips=3)
if os.path.exists(cache):
    train, held = pickle.load(open(cache, "rb"))
else:
    train = RecordingPool(0, "audio_train", int(sys.argv[1]), cfg)
    held = RecordingPool(0, "audio_held_out", 300, cfg)
    pickle.dump((train, held), open(cache, "wb"))
print("pools", time.time() - t, flush=True)
enc, scores = train_audio_encoder(AudioEncoderConfig(embed_dim=64, num_blocks=2, num_heads=4, drop_path=0.0), train, held, Schedule(int(sys.argv[2]), float(sys.argv[3]), 50), 32, 0, eval_every=100)
print(scores, "time", time.time() - t)
