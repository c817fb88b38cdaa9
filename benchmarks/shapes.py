"""The parameter sets the benchmarks time, as lists of tensor shapes.

``bench_overhead`` and ``bench_cuda`` import these from here (and nothing from each other):

* :func:`t5_small_shapes`: ``T5ForConditionalGeneration(T5Config())``, 60.5M elements (written
  out when transformers is missing);
* :func:`tinyllama_shapes`: TinyLlama-1.1B, 1.10B elements.
"""

from __future__ import annotations

import torch


def t5_small_shapes() -> tuple[list[tuple[int, ...]], str]:
    """Parameter shapes of ``T5ForConditionalGeneration(T5Config())`` (tied embedding once)."""
    try:
        from transformers import T5Config, T5ForConditionalGeneration

        with torch.device("meta"):
            model = T5ForConditionalGeneration(T5Config())
        return [tuple(p.shape) for p in model.parameters()], "transformers T5Config()"
    except Exception:  # transformers missing or incompatible: same shapes, written out
        d, ff, vocab, heads, buckets = 512, 2048, 32128, 8, 32
        attn = [(d, d)] * 4
        shapes: list[tuple[int, ...]] = [(vocab, d)]
        for stack_has_cross in (False, True):
            for i in range(6):
                shapes += attn + ([(buckets, heads)] if i == 0 else []) + [(d,)]
                if stack_has_cross:
                    shapes += [*attn, (d,)]
                shapes += [(ff, d), (d, ff), (d,)]
            shapes.append((d,))
        return shapes, "hard-coded t5-small shapes"


def tinyllama_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of TinyLlama-1.1B (22 layers, hidden 2048, GQA 4 KV heads): 1.10B."""
    d, ff, vocab, kv = 2048, 5632, 32000, 256
    layer = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d), *layer * 22, (d,), (vocab, d)]
