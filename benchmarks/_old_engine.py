"""The paper-shape run on the engine of an older tpt_jax revision (run by decode.py in a
subprocess whose PYTHONPATH holds that revision's tree): one KV cache of max_target_length per
slot, continuous batching with per-request caps, 16 decode steps per host call.

    python _old_engine.py SPEC.json  ->  prints {"tokens": N, "seconds": S} (the timed run)
"""

import json
import sys
import time

import numpy as np
from tpt_jax.think.generate import load_generator
from tpt_jax.think.slots import STEPS_PER_CALL, SlotEngine, pad_prompt


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    cfg, params = load_generator(spec["model"], spec["dtype"])
    batch, max_prefill = spec["batch"], spec["max_prefill"]
    engine = SlotEngine(
        cfg, params, max_concurrent_decodes=batch, max_prefill_length=max_prefill,
        max_target_length=max_prefill + spec["max_new"] + 1,
    )  # fmt: skip
    params = engine.load_params()

    def run(requests) -> int:
        state, pending, slots, total = engine.init_decode_state(), list(requests), {}, 0
        while pending or slots:
            for slot in range(batch):
                if slot not in slots and pending:
                    prompt, cap = pending.pop(0)
                    padded, length = pad_prompt(prompt, max_prefill)
                    prefix = engine.prefill(params=params, padded_tokens=padded, true_length=length)
                    state = engine.insert(prefix, state, slot, cap)
                    slots[slot] = cap
            state, done = engine.generate_steps(params, state, STEPS_PER_CALL)
            done = np.asarray(done)
            finished = [slot for slot in slots if done[slot]]
            for slot, tokens in zip(finished, engine.collect(state, finished), strict=True):
                total += len(tokens)
                del slots[slot]
        return total

    run([(prompt, 2) for prompt, _ in spec["requests"]])  # compiles every prefill bucket
    start = time.perf_counter()
    tokens = run([tuple(r) for r in spec["requests"]])
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
