"""Pretraining of the tiny preset's components (the stand-ins for ImageBind, EVA/BLIP-2/MiniGPT-4 and
Vicuna), once, on the synthetic world's own generator streams. No Ray here."""
