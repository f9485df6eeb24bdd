"""lm-evaluation-harness's model interface on our decoder: `tpt_jax` in lm-eval's registry.

    import tpt_jax.eval.lm  # registers the model
    lm_eval.simple_evaluate(model="tpt_jax", model_args="pretrained=MODEL_DIR", tasks=[...])

MODEL_DIR is a model folder (`tpt convert from-hf`, `tpt export`). Requests are answered as
lm-eval's own HF model (`lm_eval.models.huggingface.HFLM`) answers them: the same tokenization
(context/continuation split, BOS handling, left truncation to the context length), the same
rolling windows for perplexity, the same stop-string cut of greedy generations; the numbers
agree with it to float32 rounding (tests/test_lm_eval.py).

On a mesh (`mesh=`, what `tpt eval` passes: the host's chips shaped by the config's mesh) the
parameters are sharded as in training. On several JAX processes every process answers its share
of the requests on its own chips and all answers are gathered (`tpt_jax.eval.hosts`), so each
process's lm-eval computes the results one process would; `tpt eval` writes them on process 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import tokenizers
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from tpt_jax import storage
from tpt_jax.errors import TptError
from tpt_jax.eval import hosts
from tpt_jax.eval._logprobs import Scorer
from tpt_jax.generate import (
    GeneratorTokenizer,
    Request,
    SamplingParams,
    SlotEngine,
    continuous_batching,
    load_generator,
)

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256  # as HFLM, for tasks that set none
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed")


@register_model("tpt_jax")
class TptLM(TemplateLM):
    """A model folder answering lm-eval's loglikelihood, loglikelihood_rolling, generate_until.

    Args:
        pretrained: the model folder (local or gs://).
        batch_size: rows per forward pass and prompts generated together.
        dtype: compute dtype ("float32", "bfloat16"); empty: the folder's own.
        max_length: context length in tokens; 0: the model's `max_position`.
        max_gen_toks: generation cap of tasks that set none.
        add_bos_token: None: the tokenizer.json's own post-processor decides (as HF's
            tokenizer); True/False: always/never start a sequence with BOS.
        prefix_token_id: the token an empty context stands for; default BOS, else EOS.
        logits_chunk: positions projected onto the vocabulary at once.
        mesh: a jax Mesh of this process's devices to shard parameters and rows over (by
            `rules`, the training rules; default tpt_jax.parallel's); None: one device.
        model: (ModelConfig, parameters with stacked layers) already in memory, such as a
            training run's current parameters; `pretrained` then only names the folder of
            the tokenizer files.
    """

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 16,
        dtype: str = "",
        max_length: int = 0,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        logits_chunk: int = 256,
        mesh=None,
        rules=None,
        model=None,
        **unused,
    ):
        super().__init__()
        unused = {k: v for k, v in unused.items() if k not in ("device", "max_batch_size")}
        if unused:
            log.warning("tpt_jax model: ignoring model_args %s", sorted(unused))
        if str(batch_size).startswith("auto"):
            batch_size = 16  # no memory probing: name a number to change it
        self.batch_size = int(batch_size)
        self.model_dir = pretrained
        if model is None:
            self.cfg, params = load_generator(pretrained, dtype)
        else:
            self.cfg, params = model
            self.cfg = dataclasses.replace(self.cfg, dtype=dtype) if dtype else self.cfg
        self._mesh, self._rules = mesh, rules
        self._scorer = Scorer(self.cfg, self.batch_size, logits_chunk, mesh, rules)
        self.load_params(params)
        self._special = GeneratorTokenizer(pretrained)  # chat template, named special tokens
        self._tok = _load_tokenizer(pretrained)
        self._max_length = int(max_length) or self.cfg.max_position
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self._bos_id = self._token_id(self._special.bos_token)
        self._eos_id = self._token_id(self._special.eos_token)
        if self._eos_id is None and self.cfg.eos_token_id >= 0:
            self._eos_id = self.cfg.eos_token_id
        if self._eos_id is None:
            raise TptError(
                f"{pretrained}: no eos_token in tokenizer_config.json or the model config"
            )
        self._prefix_id = prefix_token_id
        self.answered = [0, 0]  # requests this process answered, of all it was given

    def load_params(self, params) -> None:
        """Answers from now on with `params` (stacked layers, the decoder's training layout):
        a training run's evaluation swaps them in without compiling anything again."""
        self._scorer.place(params)
        self._decode_params = None  # generation's layout (layers unstacked), made when needed

    # --- tokens ---------------------------------------------------------------------------

    def _token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eot_token_id(self) -> int:
        return self._eos_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix_id is not None:
            return int(self._prefix_id)
        return self._bos_id if self._bos_id is not None else self._eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return os.path.basename(os.path.normpath(self.model_dir))

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **_
    ) -> list[int]:
        """Token ids as HFLM's tok_encode makes them: special tokens (the tokenizer's
        post-processor, e.g. Llama-3's BOS) unless the text already starts with the prefix
        token or add_special_tokens / add_bos_token say otherwise."""
        special = add_special_tokens
        if special is None:
            special = True if self.add_bos_token is None else self.add_bos_token
            if string.startswith(self.tok_decode([self.prefix_token_id], False)):
                special = False
        ids = self._tok.encode(string, add_special_tokens=special).ids
        if (
            special
            and self.add_bos_token
            and self._bos_id is not None
            and ids[:1] != [self._bos_id]
        ):
            ids = [self._bos_id, *ids]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        return self._tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring --------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
        """requests: (key, context ids, continuation ids) -> (log p(continuation), greedy).

        Sequences longer than max_length + 1 lose tokens on the left, as in HFLM."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise TptError("lm-eval request with an empty context or continuation")
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        answers = hosts.spread(rows, self._scorer.score, size=lambda row: len(row[0]))
        self._count(len(rows))
        for (key, _, _), answer in zip(requests, answers, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) over disjoint windows of max_length tokens, each with as much context
        as fits (lm-eval's rolling windows, as HFLM)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append((None, *lm_utils.make_disjoint_window(window)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions until a stop string of `until`, EOS or `max_gen_toks` (greedy unless
        the task asks for do_sample), with the first stop string and what follows cut off."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            for i, text in zip(
                indices, self._generate_group(requests, indices, kwargs), strict=True
            ):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(1)
        bar.close()
        return out

    def _generate_group(self, requests, indices: list[int], kwargs: dict) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen = kwargs.pop("max_gen_toks")
        context_len = self.max_length - max_gen
        if context_len <= 0:
            raise TptError(
                f"max_gen_toks {max_gen} leaves no room for a prompt in the model's "
                f"{self.max_length} positions"
            )
        sampling = _sampling(kwargs)
        prompts = [
            self.tok_encode(requests[i].args[0], left_truncate_len=context_len) for i in indices
        ]
        stops = [self._tok.encode(s, add_special_tokens=False).ids for s in until if s]
        stops = [s for s in stops if s]

        def answer(share: list[list[int]]) -> list[str]:
            texts = []
            for tokens in self._generate_tokens(share, max_gen, sampling, stops):
                if self.eot_token_id in tokens:
                    tokens = tokens[: tokens.index(self.eot_token_id)]
                texts.append(postprocess_generated_text(self.tok_decode(tokens), until, None))
            return texts

        self._count(len(prompts))
        return hosts.spread(prompts, answer)

    def _count(self, n: int) -> None:
        self.answered[0] += len(range(jax.process_index(), n, jax.process_count()))
        self.answered[1] += n

    def _generate_tokens(self, prompts, max_gen: int, sampling, stops) -> list[list[int]]:
        """New tokens of each prompt (its EOS or stop sequence included), batch_size slots
        batched continuously on the engine over this process's mesh."""
        longest = max(len(p) for p in prompts)
        bucket = 1 << max(4, (longest - 1).bit_length())  # few distinct compiled sizes
        engine = SlotEngine(
            self.cfg,
            self._decode_params if self._decode_params is not None else self._scorer.params,
            max_concurrent_decodes=min(self.batch_size, len(prompts)),
            max_prefill_length=bucket,
            max_target_length=bucket + (1 << max(4, max_gen.bit_length())),
            eos_ids=(self.eot_token_id,),
            stops=stops,
            mesh=self._mesh,
            rules=self._rules,
        )
        self._decode_params = engine.load_params()  # unstacked and placed once per parameters
        requests = [
            Request(prompt, max_gen, sampling or SamplingParams(), tag=i)
            for i, prompt in enumerate(prompts)
        ]
        outputs: list[list[int]] = [[] for _ in prompts]
        for result in continuous_batching(engine, self._decode_params, requests):
            outputs[result.request.tag] = result.tokens
        return outputs

    # --- chat -----------------------------------------------------------------------------

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "tpt_jax" if chat_template and self._special.has_chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self._special.render_chat(chat_history, add_generation_prompt=add_generation_prompt)


def _sampling(kwargs: dict) -> SamplingParams | None:
    """None (greedy) unless do_sample with a positive temperature; other keys are ignored."""
    ignored = sorted(set(kwargs) - {"do_sample", *SAMPLING_KEYS})
    if ignored:
        log.warning("tpt_jax model: ignoring generation settings %s", ignored)
    if not kwargs.get("do_sample") or not kwargs.get("temperature"):
        return None
    return SamplingParams(**{k: kwargs[k] for k in SAMPLING_KEYS if k in kwargs})


def _load_tokenizer(folder: str) -> tokenizers.Tokenizer:
    path = os.path.join(folder, "tokenizer.json")
    try:
        return tokenizers.Tokenizer.from_str(storage.read_bytes(path).decode("utf-8"))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise TptError(f"{path}: cannot load the tokenizer ({e})") from None
