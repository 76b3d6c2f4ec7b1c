"""Text generation from a loaded export, with timing.

`generate_text` runs transformers' `generate()` on one prompt and measures the time to the
first new token and the decoding rate after it. The timing comes from a streamer that records
when `generate()` emits tokens. transformers rejects streamers in beam search, so with beams
only the overall rate is measured.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from tbquant.pipeline.settings import Task

# Options that only make sense when sampling. Setting one without --greedy turns sampling on.
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")


@dataclasses.dataclass
class GenerationOptions:
    """Decoding settings; None leaves a setting to the export's `generation_config.json`.

    Args:
        max_new_tokens: upper bound on the generated tokens.
        do_sample: sample (True) or decode greedily or by beam search (False). None samples
            when a sampling option is set, and otherwise follows the generation config.
        temperature, top_p, top_k: sampling settings (`top_k=0` disables top-k filtering).
        num_beams: beam search width; 1 is greedy or plain sampling.
        repetition_penalty: penalty on the logits of tokens already present; 1.0 disables it.
        seed: seed of the random generators, for reproducible sampling.
        chat: wrap the prompt as a user message with the tokenizer's chat template.

    Raises:
        ValueError: naming the first invalid setting.
    """

    max_new_tokens: int = 64
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    chat: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "a whole number of at least 1"),
            ("temperature", self.temperature, self.temperature is None or self.temperature > 0, "a number above 0"),
            ("top_p", self.top_p, self.top_p is None or 0 < self.top_p <= 1, "a number above 0 and at most 1"),
            ("top_k", self.top_k, self.top_k is None or self.top_k >= 0, "a whole number of at least 0"),
            ("num_beams", self.num_beams, self.num_beams is None or self.num_beams >= 1, "a whole number of at least 1"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty is None or self.repetition_penalty > 0, "a number above 0"),
        ]
        for name, value, valid, expected in checks:
            if not valid:
                raise ValueError(f"invalid {name} {value!r}: expected {expected}")
        sampling = [name for name in SAMPLING_OPTIONS if getattr(self, name) is not None]
        if self.do_sample is False and sampling:
            raise ValueError(f"invalid combination: {sampling[0]} needs sampling, which do_sample=False turns off")

    def generate_kwargs(self) -> dict:
        """Return the keyword arguments for `generate()`: only the settings that are not None."""
        do_sample = self.do_sample
        if do_sample is None and any(getattr(self, name) is not None for name in SAMPLING_OPTIONS):
            do_sample = True
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
        }
        return {name: value for name, value in kwargs.items() if value is not None}


@dataclasses.dataclass
class GenerationResult:
    """Generated text and its timing."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float | None  # time to the first new token (prefill), None with beam search

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Rate of the tokens after the first, which excludes the prompt's forward pass."""
        if self.first_token_seconds is None or self.new_tokens < 2 or self.seconds <= self.first_token_seconds:
            return None
        return (self.new_tokens - 1) / (self.seconds - self.first_token_seconds)


class _TokenClock(BaseStreamer):
    """Streamer that records when `generate()` emits the prompt (first call) and each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build_inputs(tokenizer, prompt: str, chat: bool) -> dict[str, torch.Tensor]:
    """Tokenize `prompt`, as a user message in the tokenizer's chat template when `chat` is set.

    Raises:
        ValueError: if `chat` is set and the tokenizer has no chat template.
    """
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    # A chat template already contains the special tokens it needs. Token type ids are left out
    # because most generative models do not accept them.
    encoded = tokenizer(prompt, add_special_tokens=not chat, return_token_type_ids=False, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.no_grad()
def generate_text(model, tokenizer, task: Task, prompt: str, options: GenerationOptions) -> GenerationResult:
    """Generate a continuation of `prompt` (causal LM) or an output for it (seq2seq LM).

    Returns the new text only, without the prompt, and its timing.
    """
    if options.seed is not None:
        transformers.set_seed(options.seed)
    device = next(model.parameters()).device
    inputs = {name: tensor.to(device) for name, tensor in build_inputs(tokenizer, prompt, options.chat).items()}
    prompt_tokens = inputs["input_ids"].shape[1]
    kwargs = options.generate_kwargs()

    num_beams = kwargs.get("num_beams") or getattr(model.generation_config, "num_beams", 1) or 1
    clock = _TokenClock() if num_beams == 1 else None
    start = time.perf_counter()
    output = model.generate(**inputs, **kwargs, streamer=clock)
    seconds = time.perf_counter() - start

    # A causal LM returns the prompt followed by the new tokens; a seq2seq LM returns the decoder
    # start token followed by the new tokens.
    skip = prompt_tokens if task == Task.CAUSAL_LM else 1
    new_ids = output[0, skip:]
    first_token_seconds = clock.times[1] - start if clock is not None and len(clock.times) > 1 else None
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        prompt_tokens=prompt_tokens,
        new_tokens=int(new_ids.numel()),
        seconds=seconds,
        first_token_seconds=first_token_seconds,
    )
