"""Data: the synthetic corpus generator and its vocabulary."""

from bubogpt.data.synth import SIZES, CorpusSize, SynthError, synthesize
from bubogpt.data.vocab import all_corpus_words, sample_texts

__all__ = ["SIZES", "CorpusSize", "SynthError", "synthesize", "all_corpus_words", "sample_texts"]
