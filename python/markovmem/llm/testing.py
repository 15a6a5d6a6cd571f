"""Assertion helpers for tests of expanded models (re-exported by markovmem.testing).

Imports torch only when called, so importing this module needs no torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["assert_no_forgetting", "tiny_model", "tiny_tokenizer"]


def assert_no_forgetting(base_model: Any, model: Any, contexts: Any, **kwargs: Any) -> Any:
    """Assert exact zero forgetting of an expanded model; return the report.

    Runs :func:`markovmem.llm.verify_no_forgetting` (same arguments) and
    raises AssertionError listing every failed figure unless the old-vocabulary
    logits (and the old-conditional distribution) are bitwise equal to the base
    model's, new tokens get probability exactly 0 after old-only contexts (with
    block_output), no base tensor changed, and, when ``max_leak=`` is given
    for new tokens that can be generated, the leak statistic
    (``leak_statistic=``, default the max) is at most ``max_leak``.

    Examples
    --------
    >>> ids = llm.add_tokens(model, tokenizer, ["glorp"])      # doctest: +SKIP
    >>> assert_no_forgetting(base, model, [[1, 403, 407]])      # doctest: +SKIP
    >>> assert_no_forgetting(base, open_model, contexts, max_leak=0.01)  # doctest: +SKIP
    """
    from . import verify_no_forgetting

    __tracebackhide__ = True  # pytest: report the caller's line
    report = verify_no_forgetting(base_model, model, contexts, **kwargs)
    if not report.ok:
        raise AssertionError("zero forgetting violated:\n  " + "\n  ".join(report.failures()) + "\n" + str(report))
    return report


def tiny_tokenizer(vocab_size: int = 64) -> Any:
    """A word-level transformers tokenizer over ``vocab_size`` words, for tests.

    Ids: ``<unk>`` 0, ``<s>`` 1 (BOS, prepended to every text), ``</s>`` 2,
    then ``w3 .. w{vocab_size - 1}``.  Words are split on whitespace.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 4:
        raise ValueError(f"vocab_size is {vocab_size}; expected >= 4")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model(
    arch: str = "llama",
    vocab_size: int = 64,
    *,
    tied: bool = True,
    dtype: Any = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
) -> Any:
    """A randomly initialised transformers causal LM built from a config, in eval mode, for tests.

    Parameters
    ----------
    arch : {'llama', 'qwen2', 'gpt2'}
    vocab_size : int
    tied : bool
        Tie input and output embeddings.
    dtype : torch.dtype, optional
        Cast after construction (e.g. ``torch.bfloat16``).
    hidden_size, num_layers : int
    seed : int
        ``torch.manual_seed`` before construction.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in ("llama", "qwen2", "gpt2"):
        raise ValueError(f"arch is {arch!r}; expected 'llama', 'qwen2' or 'gpt2'")
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    decoder: dict[str, Any] = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    torch.manual_seed(seed)
    model: Any
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=256, **common))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
