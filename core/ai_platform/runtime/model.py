"""A model folder loaded for serving: tokenizer, chat template, ONNX decoder and stop tokens."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ai_platform.engine_contract import PromptTooLongError
from ai_platform.operations import Choice, Completion, Message
from ai_platform.runtime.generation import Generated, Steps, option_log_likelihoods_steps, run_steps
from ai_platform.runtime.manifest import verify_manifest
from ai_platform.runtime.onnx_model import OnnxDecoder
from ai_platform.runtime.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache
from ai_platform.runtime.tokenizer import ChatTokenizer
from ai_platform.settings import ExecutionProvider


def _eos_ids(generation_config: Path) -> list[int]:
    if not generation_config.is_file():
        return []
    eos = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]


class PromptEncoder:
    """A model folder's text side: chat template, tokenizer, context size and stop tokens; no ONNX session.

    The server checks prompts with it before admitting a request (its model may run in another process).
    """

    def __init__(self, tokenizer: ChatTokenizer, max_positions: int, eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        # A chat model's tokenizer eos is its end-of-turn token; generation_config.json
        # may list more stop tokens (e.g. Qwen2.5: <|im_end|> and <|endoftext|>).
        end_of_turn = tokenizer.eos_token_id
        ordered = ([end_of_turn] if end_of_turn is not None else []) + list(eos_ids)
        if not ordered:
            raise ValueError("no eos token in generation_config.json or tokenizer_config.json")
        self.end_of_turn_id = ordered[0]
        self.eos_ids = frozenset(ordered)

    @classmethod
    def from_folder(cls, folder: Path) -> PromptEncoder:
        """The text side of a model folder (tokenizer files, config.json, generation_config.json)."""
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        eos_ids = _eos_ids(folder / "generation_config.json")
        return cls(ChatTokenizer.from_folder(folder), int(config["max_position_embeddings"]), eos_ids)

    def _check_fits(self, prompt_tokens: int, reserved: int) -> None:
        """Reject a prompt that leaves fewer than ``reserved`` positions of context for the answer."""
        most = self.max_positions - reserved
        if prompt_tokens > most:
            raise PromptTooLongError(prompt_tokens, most)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Prompt token ids for generation; raises PromptTooLongError if no room is left to answer."""
        ids = self.tokenizer.encode(self.tokenizer.render(messages))
        self._check_fits(len(ids), 1)
        return ids

    def encode_choice(self, messages: Sequence[Message], options: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Prompt ids and each option's answer ids (ending with the end-of-turn token)."""
        prompt_text = self.tokenizer.render(messages)
        prompt = self.tokenizer.encode(prompt_text)
        answers = []
        for option in options:
            # Encode the option in place after the prompt, so tokenizers that treat
            # word starts specially (leading spaces, SentencePiece's "▁") see what
            # the model would see; fall back to the bare option if the prompt's
            # tokens merge with it across the boundary.
            joined = self.tokenizer.encode(prompt_text + option)
            tokens = joined[len(prompt) :] if joined[: len(prompt)] == prompt else self.tokenizer.encode(option)
            answers.append([*tokens, self.end_of_turn_id])
        self._check_fits(len(prompt), max(len(answer) for answer in answers))
        return prompt, answers

    def budget(self, prompt: Sequence[int], max_new_tokens: int) -> int:
        """New tokens ``prompt`` may get: the token limit, or the context left if that is less."""
        return max(0, min(max_new_tokens, self.max_positions - len(prompt)))

    def completion(self, result: Generated) -> Completion:
        """The :class:`Completion` for generated token ids."""
        return Completion(
            text=self.tokenizer.decode(result.tokens).strip(),
            output_tokens=len(result.tokens),
            finish_reason=result.finish_reason,
        )


# Neutral prompts whose option scores a model keeps (the oldest goes first); a few kB each.
BASELINES_KEPT = 256


class LanguageModel(PromptEncoder):
    """A model folder loaded for serving: its text side plus the ONNX decoder and a prefix cache.

    The heavy methods run on the model's engine-loop thread.
    """

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        decoder: OnnxDecoder,
        eos_ids: Sequence[int],
        prefix_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(tokenizer, decoder.max_positions, eos_ids)
        self.decoder = decoder
        # Shared by generation and option scoring, on the model's thread.
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        # Options' log-likelihoods under neutral prompts (Choose.neutral), by prompt and answers:
        # an operation's neutral prompt depends on its options, not on the text, so it repeats.
        self._baselines: dict[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]], list[float]] = {}

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        execution_provider: ExecutionProvider,
        intra_op_threads: int | None,
        prefix_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> LanguageModel:
        """Load a model folder (config.json, generation_config.json, tokenizer files, the ONNX graph).

        A folder with ``genai_config.json`` holds an onnxruntime-genai builder graph (fused
        attention; its file name is in that config); otherwise ``model.onnx`` is an optimum export.
        A folder with ``manifest.json`` must match it (``ManifestMismatch`` otherwise).
        """
        verify_manifest(folder)
        genai_config = folder / "genai_config.json"
        fused = genai_config.is_file()
        name = "model.onnx"
        if fused:
            name = json.loads(genai_config.read_text(encoding="utf-8"))["model"]["decoder"].get("filename", name)
        model_file = folder / name
        if not model_file.is_file():
            raise FileNotFoundError(f"{name} not found in the model folder")
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        decoder = OnnxDecoder(
            model_file,
            config,
            execution_provider=execution_provider,
            intra_op_threads=intra_op_threads,
            fused_attention=fused,
        )
        eos_ids = _eos_ids(folder / "generation_config.json")
        return cls(ChatTokenizer.from_folder(folder), decoder, eos_ids, prefix_cache_bytes)

    @property
    def provider(self) -> str:
        return self.decoder.provider

    def choose(
        self,
        prompt: list[int],
        answers: list[list[int]],
        options: Sequence[str],
        should_stop: Callable[[], bool],
        baseline: tuple[list[int], list[list[int]]] | None = None,
    ) -> Choice:
        """All of :meth:`choose_steps` at once, checking ``should_stop`` before each forward pass."""
        return run_steps(self.choose_steps(prompt, answers, options, baseline), should_stop)

    def choose_steps(
        self,
        prompt: list[int],
        answers: list[list[int]],
        options: Sequence[str],
        baseline: tuple[list[int], list[list[int]]] | None = None,
    ) -> Steps[Choice]:
        """Probabilities of the options, in option order; a forward pass per slice.

        Each option's score is its log-likelihood (the sum over its answer tokens, end-of-turn
        included), minus, with a ``baseline`` (a neutral prompt and its answers, from
        :meth:`encode_choice`), its log-likelihood there; the probabilities are their softmax.
        """
        scores = yield from option_log_likelihoods_steps(self.decoder, prompt, answers, cache=self.prefix_cache)
        if baseline is not None:
            key = (tuple(baseline[0]), tuple(tuple(answer) for answer in baseline[1]))
            prior = self._baselines.get(key)
            if prior is None:
                prior = yield from option_log_likelihoods_steps(self.decoder, *baseline, cache=self.prefix_cache)
                if len(self._baselines) >= BASELINES_KEPT:
                    del self._baselines[next(iter(self._baselines))]
                self._baselines[key] = prior
            scores = [score - neutral for score, neutral in zip(scores, prior, strict=True)]
        probabilities = option_probabilities(scores)
        best = probabilities.index(max(probabilities))
        return Choice(
            scores=dict(zip(options, probabilities, strict=True)),
            output_tokens=len(answers[best]),
        )


def option_probabilities(scores: Sequence[float]) -> list[float]:
    """softmax(scores): the options' log-likelihoods (up to a shared constant) as probabilities summing to 1."""
    top = max(scores)
    weights = [math.exp(score - top) for score in scores]
    norm = sum(weights)
    return [weight / norm for weight in weights]
