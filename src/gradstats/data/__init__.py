"""Embedded data: the character-level Shakespeare corpus and a loader for any text file."""

from gradstats.data.shakespeare_char import CharCorpus, load_corpus, shakespeare_char, text_corpus

__all__ = ["CharCorpus", "load_corpus", "shakespeare_char", "text_corpus"]
