"""Training data: corpora, vocabularies, SeqIO tasks, packing and loading."""
