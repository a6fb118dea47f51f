"""A small byte-level BPE tokenizer in the style of Qwen2's, trained on a built-in corpus."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 1024  # an upper bound: the corpus runs out of merges at 969

# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
The platform runs language models on servers that never touch the internet. An administrator copies a
checkpoint onto the machine, exports it once, and the server loads the exported graph at start-up. Every
request names an operation, such as summarize, translate or classify, and the operation decides which
prompt to build, which limits apply and how the model's answer becomes a response.

Summaries should be short and faithful. A good summary keeps the names, the numbers and the decisions,
and it drops the greetings, the repetition and the small talk. When a meeting ran for 45 minutes and
covered 3 topics, the summary says what was decided about each topic and who will do what by when.

Translation keeps the meaning and the tone of the original text. Dates like 2024-05-17, amounts like
1,250.00 euros and product codes like AB-7731 must survive unchanged. Names of people and places are
not translated unless the target language has a well-known form for them.

Classification picks one label from a fixed list. The ticket "I was charged twice this month" belongs
to billing; "the app crashes when I open settings" belongs to bugs; "can you add a dark theme?" is a
feature request. If nothing fits, the honest answer is "other", and the caller can route it to a person.

Usage is counted per key and per day. Each key has a daily limit; when it is reached, the server answers
with status 429 and tells the caller when the limit resets. Counting happens after the request succeeds,
so a failed call does not use up anybody's quota. Administrators can read the totals at any time.

Plugins are ordinary Python packages. A team writes a small module that declares its request and response
schemas, its default limits and its prompt, installs it with pip, and the server finds it at the next
start through an entry point. Nothing in the core has to change, and a broken plugin is reported instead
of taking the whole server down with it.

Models are exported ahead of time. The export step reads the weights, checks that the exported graph
generates exactly the tokens the original generates, and writes a folder with the graph, the tokenizer
and the chat template. Building that folder twice gives the same bytes, which makes caching simple and
lets a test suite rebuild its fixtures without surprises. Quick checks: 7 + 8 = 15, 12 x 12 = 144.

Operators watch three numbers: requests per second, the time to the first token, and the tokens generated
per second while decoding. Batching raises throughput but may delay a single request; the scheduler lets
new sequences join at every step, which keeps the queue short when traffic suddenly doubles at 09:30.
"""


def train_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """Train the tokenizer on the built-in corpus; every run gives the same result."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # split above already
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: any text round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
