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
the same time. bf16 gave no speed-up on this CPU (7.7k tokens/s against 9.5k in fp32).

Batch: 2 rows of 256 tokens, 1200 steps (614k tokens per seed). With one seed of the TPT model
and 410k tokens (pilot), the training loss over the last 40 steps was 0.79 with batches of 8,
0.67 with 4 and 0.50 with 2 (the same tokens, 4x the updates); a peak learning rate of 1e-2
(0.92) or 5e-3 (0.76), no weight decay (0.74) or 8 heads (0.83) did not come close. Alone, batches
of 2 are slower per token, but the demo trains each model's 3 seeds in one vmapped step, which
turns them into batches of 6: 9.9k tokens/s for all seeds (7k with batches of 8). The budget
then fills the 10 minutes.

Pilots (testbed sample and seeds 1000; not the runs below):
- 512 unigram pieces, 2 seeds, 614k tokens, batches of 8: TPT thinking-first 5.3%, always the
  most frequent answer 6.5%; direct answers vanilla 11.8%, TPT 8.0%.
- the vocabulary above, 3 seeds, 410k tokens, batches of 2: direct answers vanilla 12.0%
  (seeds 10-13%), TPT 10.0%; TPT thinking-first 4.7%; 6.6 minutes in all.
- one seed, 2.05M tokens (5x the budget), batches of 8: direct answers vanilla 27%, TPT 15%;
  TPT thinking-first 13%. Its reasoning gets the arithmetic of a step right in 66% of the steps
  it writes and copies the starting amount in 60% of problems, but only 19% of the teacher's
  step lines appear in it: what it lacks is following the story's operations in order (which
  verb and number come next), not the arithmetic.

What the pilots show: within 10 minutes of 2 CPU cores the TPT model writes the form of the
reasoning without following the story, so its thinking-first accuracy is not clearly above
chance and that comparison does not yet test the paper's claim; the vanilla model's direct
answers rise faster with tokens (27% at 5x the budget). Given a question and then the think
tag, the TPT model may first state an answer (its training put the thinking after the document,
answer included) and then reason; the measure scores the answer its reasoning ends with. The
vanilla model, which never saw the tag, mostly stops at once. Longer runs:
`tpt demo --seeds N train.steps=S train.global_batch=B`."""
