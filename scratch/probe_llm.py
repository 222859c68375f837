import sys, time, torch
torch.set_num_threads(2)
from bubogpt.config import LLMConfig
from bubogpt.pretraining.tiny_components import Schedule, train_llm, build_tokenizer, draw_text_example, encode_pieces
tok = build_tokenizer()
for i in range(3):
    p, t, r = draw_text_example(0, "llm_train", i)
    print(p, t, len(encode_pieces(tok, p, t)[0]))
h, L, steps, lr, bs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
cfg = LLMConfig(hidden_size=h, num_layers=L, num_heads=4, intermediate_size=int(h*2.6875), max_position_embeddings=1024)
t = time.time()
llm, report = train_llm(cfg, tok, Schedule(steps, lr, 100), bs, 0, eval_every=int(sys.argv[6]), eval_count=200, answer_only=sys.argv[7] == "answer")
print(report.metrics()); print(report.examples[:12]); print("time", time.time()-t)
llm.save_pretrained(f"/tmp/t-tiny-llm-{h}-{L}-{steps}-{sys.argv[7]}"); tok.save_pretrained(f"/tmp/t-tiny-llm-{h}-{L}-{steps}-{sys.argv[7]}")
