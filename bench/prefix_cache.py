"""Time to prefill the seed operations' prompts with and without the prefix cache.

Each operation's prompts share their system prompt, instruction and chat template;
only the client's text differs. For each operation and text, in alternating order:
prefill from scratch, and prefill with a cache that holds one earlier request of the
same operation (another text). Medians over texts and rounds; the model runs as it
does in the server (2 threads).

    .venv/bin/python bench/prefix_cache.py models/smollm2-135m-instruct [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from concurrency import TEXTS

from ai_platform.runtime.generation import prefill
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.prefix_cache import PrefixCache
from ai_platform_classify import ClassifyRequest
from ai_platform_classify import prompt as classify_prompt
from ai_platform_summarize import SummarizeRequest
from ai_platform_summarize import prompt as summarize_prompt
from ai_platform_translate import TranslateRequest
from ai_platform_translate import prompt as translate_prompt

OPERATIONS = {
    "summarize": lambda text: summarize_prompt(SummarizeRequest(text=text, max_sentences=2)).messages,
    "translate": lambda text: (
        translate_prompt(TranslateRequest(text=text, source_language="en", target_language="fr")).messages
    ),
    "classify": lambda text: (
        classify_prompt(
            ClassifyRequest(text=text, categories=["politics", "business", "culture", "technology"])
        ).messages
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="served model folder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = LanguageModel.load(args.model, execution_provider="cpu", intra_op_threads=2)
    never = lambda: False  # noqa: E731
    print("| operation | prompt tokens | reused | cold ms | with cache ms | cold ÷ cached |")
    print("|---|---|---|---|---|---|")
    for name, messages in OPERATIONS.items():
        prompts = [model.tokenizer.encode(model.tokenizer.render(messages(text))) for text in TEXTS]
        prefill(model.decoder, prompts[0], never)  # warm-up
        cold, warm, reused = [], [], []
        for _ in range(args.rounds):
            for index, prompt in enumerate(prompts):
                started = time.perf_counter()
                prefill(model.decoder, prompt, never)
                cold.append(time.perf_counter() - started)
                cache = PrefixCache()
                prefill(model.decoder, prompts[index - 1], never, cache)  # an earlier request, another text
                started = time.perf_counter()
                prefill(model.decoder, prompt, never, cache)
                warm.append(time.perf_counter() - started)
                reused.append(cache.reused_tokens)
        c, w = statistics.median(cold) * 1000, statistics.median(warm) * 1000
        tokens = statistics.median(len(p) for p in prompts)
        print(f"| {name} | {tokens:.0f} | {statistics.median(reused):.0f} | {c:.0f} | {w:.0f} | {c / w:.2f} |")


if __name__ == "__main__":
    main()
