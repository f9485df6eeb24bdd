"""Why the demo's model size, vocabulary and token budget are what they are (decided from pilot
runs on another testbed sample and other seeds than the demo's; written into report.md)."""

WHY = """\
The budget is set by `make demo`'s limit of 10 minutes on 2 CPU cores for 3 seeds of 2 models,
each scored at 5 points on 100 held-out problems (about 4 s per seed and point).

Vocabulary: 1024 requested pieces of SentencePiece BPE (752 learnt on this small lexicon; a
unigram model of the same size kept only 480 pieces, split `answer` and `Kai` into letters and
made a TPT sample 196 tokens long instead of 109), with every number 0-99 a piece of its own so
that an operation's result is one token wherever it stands ("71." and "71," alike).

Model: the 0.85M-parameter decoder (4 layers, hidden 128). A 4.9M one (6 layers, hidden 256)
trains at 2.6k tokens/s here, a third of the speed, so it would see under 150k tokens per seed in
the same time. Training a model's seeds together (one vmapped step) and bf16 gave no speed-up on
this CPU (8.9k and 7.7k tokens/s against 9.5k for one fp32 seed). Batches of 8 rather than 16
rows give twice the updates for the same tokens.

Pilots (testbed sample and seeds 1000, abundant data; not the runs below):
- 512 unigram pieces, 2 seeds, 614k tokens: TPT thinking-first 5.3% (seeds 3.5-7.0%), always
  the most frequent answer 6.5%; direct answers vanilla 11.8%, TPT 8.0%.
- the vocabulary above, 3 seeds, 328k tokens, 7 minutes in all: TPT thinking-first 5.3%
  (3.0-7.0%; 8.0% at 200k tokens), vanilla 0.3%, most frequent answer 7.0%; direct answers
  vanilla 10.3%, TPT 9.0%. So the budget was raised to 200 steps of 8 x 256 tokens (410k).

What the pilots show, and the runs below repeat: at this budget the TPT model writes the form
of the reasoning but not its arithmetic (`2 * 2 = 3`), so its accuracy is not clearly above
chance and the comparison does not yet test the paper's claim; a budget where it would is beyond
what 10 minutes on 2 cores trains. Given a question and then the think tag, the TPT model also
first writes an answer and a new document (its training put the thinking after the document,
answer included), and the vanilla model, which never saw the tag, stops at once. Longer runs:
`tpt demo --seeds N train.steps=S train.global_batch=B`."""
