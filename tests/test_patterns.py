"""Tests for :mod:`hf_dropgrad.patterns`: resolving drop rates from submodule-name patterns.

Table-driven over tiny config-built models (T5, BART, bert2bert, LoRA-wrapped T5, plain torch).
Every case asserts the rate of *every* parameter name, aliases of tied parameters included.
"""

from __future__ import annotations

import doctest
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from hf_dropgrad import patterns as patterns_module
from hf_dropgrad.patterns import (
    ResolvedRate,
    format_rate_table,
    is_plain_pattern,
    parse_module_rates,
    parse_rate,
    resolve_pattern_rates,
)

transformers = pytest.importorskip("transformers")

Named = list[tuple[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


def _t5(num_layers: int = 2) -> nn.Module:
    config = transformers.T5Config(
        vocab_size=100,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return transformers.T5ForConditionalGeneration(config)


def _bart() -> nn.Module:
    config = transformers.BartConfig(
        vocab_size=100,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    return transformers.BartForConditionalGeneration(config)


def _bert2bert() -> nn.Module:
    kwargs = dict(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    encoder = transformers.BertModel(transformers.BertConfig(**kwargs))
    decoder = transformers.BertLMHeadModel(
        transformers.BertConfig(**kwargs, is_decoder=True, add_cross_attention=True)
    )
    return transformers.EncoderDecoderModel(encoder=encoder, decoder=decoder)


def _lora_t5() -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"])
    return peft.get_peft_model(_t5(num_layers=1), config)


class Toy(nn.Module):
    """A plain torch model with look-alike names and one tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        block = {"0": nn.Linear(2, 2), "01": nn.Linear(2, 2), "1": nn.Linear(2, 2)}
        self.encoder = nn.ModuleDict({"block": nn.ModuleDict(block)})
        self.pre_encoder = nn.Linear(2, 2)
        self.encoderx = nn.ModuleDict({"y": nn.Linear(2, 2)})
        self.model = nn.ModuleDict({"encoder": nn.Linear(2, 2)})
        self.head = nn.Linear(2, 2)
        self.head.weight = self.encoder.block["1"].weight


_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "t5": _t5,
    "t5_6": lambda: _t5(num_layers=6),
    "bart": _bart,
    "bert2bert": _bert2bert,
    "lora_t5": _lora_t5,
    "toy": Toy,
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """A cache of the tiny models, each built on first use (keeps the run light)."""
    torch.manual_seed(0)
    return {}


def _model(models: dict[str, nn.Module], key: str) -> nn.Module:
    if key not in models:
        models[key] = _BUILDERS[key]()
    return models[key]


def _named(models: dict[str, nn.Module], key: str) -> Named:
    return list(_model(models, key).named_parameters(remove_duplicate=False))


def _rates_by_name(named: Named, resolved: dict[torch.Tensor, ResolvedRate]) -> dict:
    return {name: (resolved[p].rate if p in resolved else None) for name, p in named}


# --------------------------------------------------------------------------------------------
# is_plain_pattern
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "plain"),
    [
        ("encoder", True),
        ("encoder.block.0", True),
        ("SelfAttention", True),
        ("lora_A", True),
        ("0", True),
        ("base_model.model.encoder", True),
        (".*attention.*", False),
        (r"encoder\.block", False),
        ("encoder-block", False),
        ("encoder*", False),
        ("(?i)attention", False),
        ("encoder block", False),
        ("", False),
    ],
)
def test_is_plain_pattern(pattern: str, plain: bool) -> None:
    assert is_plain_pattern(pattern) is plain


# --------------------------------------------------------------------------------------------
# T5: one golden table, one column per pattern set, one row per parameter name (aliases too)
# --------------------------------------------------------------------------------------------

T5_SCENARIOS: dict[str, dict[str, float]] = {
    "A": {"encoder": 0.1, "decoder": 0.2},
    "B": {".*SelfAttention.*": 0.3},
    "C": {"encoder": 0.1, "encoder.block.0": 0.3},  # nested override: more components win
    "D": {"encoder": 0.1, "decoder": 0.2, ".*SelfAttention.*": 0.5},  # regex beats plain
    "E": {".*attention.*": 0.4},  # case-sensitive: only relative_attention_bias
    "F": {"decoder": 0.2, "layer_norm": 0.0},  # equal components: the narrower one wins
    "G": {"decoder.embed_tokens": 0.3, "DenseReluDense.wi": 0.6},  # alias-only, mid-name
}

# "-" = no rate. The four rows of the tied embedding (shared / encoder.embed_tokens /
# decoder.embed_tokens / lm_head) are one tensor and must agree.
T5_GOLDEN = """
name                                                                 A   B   C   D   E   F   G
shared.weight                                                        0.1 -   0.1 0.1 -   0.2 0.3
encoder.embed_tokens.weight                                          0.1 -   0.1 0.1 -   0.2 0.3
encoder.block.0.layer.0.SelfAttention.q.weight                       0.1 0.3 0.3 0.5 -   -   -
encoder.block.0.layer.0.SelfAttention.k.weight                       0.1 0.3 0.3 0.5 -   -   -
encoder.block.0.layer.0.SelfAttention.v.weight                       0.1 0.3 0.3 0.5 -   -   -
encoder.block.0.layer.0.SelfAttention.o.weight                       0.1 0.3 0.3 0.5 -   -   -
encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight 0.1 0.3 0.3 0.5 0.4 -   -
encoder.block.0.layer.0.layer_norm.weight                            0.1 -   0.3 0.1 -   0   -
encoder.block.0.layer.1.DenseReluDense.wi.weight                     0.1 -   0.3 0.1 -   -   0.6
encoder.block.0.layer.1.DenseReluDense.wo.weight                     0.1 -   0.3 0.1 -   -   -
encoder.block.0.layer.1.layer_norm.weight                            0.1 -   0.3 0.1 -   0   -
encoder.block.1.layer.0.SelfAttention.q.weight                       0.1 0.3 0.1 0.5 -   -   -
encoder.block.1.layer.0.SelfAttention.k.weight                       0.1 0.3 0.1 0.5 -   -   -
encoder.block.1.layer.0.SelfAttention.v.weight                       0.1 0.3 0.1 0.5 -   -   -
encoder.block.1.layer.0.SelfAttention.o.weight                       0.1 0.3 0.1 0.5 -   -   -
encoder.block.1.layer.0.layer_norm.weight                            0.1 -   0.1 0.1 -   0   -
encoder.block.1.layer.1.DenseReluDense.wi.weight                     0.1 -   0.1 0.1 -   -   0.6
encoder.block.1.layer.1.DenseReluDense.wo.weight                     0.1 -   0.1 0.1 -   -   -
encoder.block.1.layer.1.layer_norm.weight                            0.1 -   0.1 0.1 -   0   -
encoder.final_layer_norm.weight                                      0.1 -   0.1 0.1 -   -   -
decoder.embed_tokens.weight                                          0.1 -   0.1 0.1 -   0.2 0.3
decoder.block.0.layer.0.SelfAttention.q.weight                       0.2 0.3 -   0.5 -   0.2 -
decoder.block.0.layer.0.SelfAttention.k.weight                       0.2 0.3 -   0.5 -   0.2 -
decoder.block.0.layer.0.SelfAttention.v.weight                       0.2 0.3 -   0.5 -   0.2 -
decoder.block.0.layer.0.SelfAttention.o.weight                       0.2 0.3 -   0.5 -   0.2 -
decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight 0.2 0.3 -   0.5 0.4 0.2 -
decoder.block.0.layer.0.layer_norm.weight                            0.2 -   -   0.2 -   0   -
decoder.block.0.layer.1.EncDecAttention.q.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.0.layer.1.EncDecAttention.k.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.0.layer.1.EncDecAttention.v.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.0.layer.1.EncDecAttention.o.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.0.layer.1.layer_norm.weight                            0.2 -   -   0.2 -   0   -
decoder.block.0.layer.2.DenseReluDense.wi.weight                     0.2 -   -   0.2 -   0.2 0.6
decoder.block.0.layer.2.DenseReluDense.wo.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.0.layer.2.layer_norm.weight                            0.2 -   -   0.2 -   0   -
decoder.block.1.layer.0.SelfAttention.q.weight                       0.2 0.3 -   0.5 -   0.2 -
decoder.block.1.layer.0.SelfAttention.k.weight                       0.2 0.3 -   0.5 -   0.2 -
decoder.block.1.layer.0.SelfAttention.v.weight                       0.2 0.3 -   0.5 -   0.2 -
decoder.block.1.layer.0.SelfAttention.o.weight                       0.2 0.3 -   0.5 -   0.2 -
decoder.block.1.layer.0.layer_norm.weight                            0.2 -   -   0.2 -   0   -
decoder.block.1.layer.1.EncDecAttention.q.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.1.layer.1.EncDecAttention.k.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.1.layer.1.EncDecAttention.v.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.1.layer.1.EncDecAttention.o.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.1.layer.1.layer_norm.weight                            0.2 -   -   0.2 -   0   -
decoder.block.1.layer.2.DenseReluDense.wi.weight                     0.2 -   -   0.2 -   0.2 0.6
decoder.block.1.layer.2.DenseReluDense.wo.weight                     0.2 -   -   0.2 -   0.2 -
decoder.block.1.layer.2.layer_norm.weight                            0.2 -   -   0.2 -   0   -
decoder.final_layer_norm.weight                                      0.2 -   -   0.2 -   0.2 -
lm_head.weight                                                       0.1 -   0.1 0.1 -   0.2 0.3
"""


def _parse_golden(text: str) -> dict[str, dict[str, float | None]]:
    header, *lines = text.strip().splitlines()
    columns = header.split()[1:]
    table: dict[str, dict[str, float | None]] = {c: {} for c in columns}
    for line in lines:
        name, *cells = line.split()
        assert len(cells) == len(columns), line
        for column, cell in zip(columns, cells, strict=True):
            table[column][name] = None if cell == "-" else float(cell)
    return table


@pytest.mark.parametrize("scenario", sorted(T5_SCENARIOS))
def test_t5_golden_table(models: dict[str, nn.Module], scenario: str) -> None:
    named = _named(models, "t5")
    expected = _parse_golden(T5_GOLDEN)[scenario]
    assert list(expected) == [name for name, _ in named], "golden table out of date"
    resolved = resolve_pattern_rates(named, T5_SCENARIOS[scenario])
    assert _rates_by_name(named, resolved) == expected


def test_t5_result_keys_are_tensors_with_canonical_names(models: dict[str, nn.Module]) -> None:
    t5 = _model(models, "t5")
    named = _named(models, "t5")
    resolved = resolve_pattern_rates(named, {"encoder": 0.1, "decoder": 0.2})
    canonical = dict(t5.named_parameters())  # what named_parameters() reports: one per tensor
    assert len(resolved) == len(canonical)
    assert [r.name for r in resolved.values()] == list(canonical)
    for name, param in canonical.items():
        assert resolved[param].name == name
    # One entry for the tied embedding, under the name named_parameters() reports.
    assert resolved[t5.shared.weight] == ResolvedRate(0.1, "shared.weight", "encoder")
    assert t5.lm_head.weight is t5.shared.weight


# --------------------------------------------------------------------------------------------
# Tied parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_key", "patterns", "expected"),
    [
        # T5: shared.weight = encoder/decoder.embed_tokens.weight = lm_head.weight.
        ("t5", {"encoder": 0.1, "decoder": 0.2}, (0.1, "shared.weight", "encoder")),
        ("t5", {"decoder": 0.2, "encoder": 0.1}, (0.1, "shared.weight", "encoder")),
        ("t5", {"shared": 0.0, "encoder": 0.1, "decoder": 0.2}, (0.0, "shared.weight", "shared")),
        ("t5", {"decoder.embed_tokens": 0.3}, (0.3, "shared.weight", "decoder.embed_tokens")),
        (
            "t5",
            {"encoder": 0.1, "decoder.embed_tokens": 0.3},
            (0.3, "shared.weight", "decoder.embed_tokens"),
        ),
        ("t5", {"lm_head": 0.4}, (0.4, "shared.weight", "lm_head")),
        # Same depth (0): the first alias decides (decoder.embed_tokens comes before lm_head).
        ("t5", {"lm_head": 0.5, "decoder": 0.2}, (0.2, "shared.weight", "decoder")),
        # Two aliases with equally specific patterns: the first alias (encoder.*) decides,
        # whatever the mapping order.
        (
            "t5",
            {"encoder.embed_tokens": 0.1, "decoder.embed_tokens": 0.2},
            (0.1, "shared.weight", "encoder.embed_tokens"),
        ),
        (
            "t5",
            {"decoder.embed_tokens": 0.2, "encoder.embed_tokens": 0.1},
            (0.1, "shared.weight", "encoder.embed_tokens"),
        ),
        ("t5", {".*decoder.*": 0.2, ".*encoder.*": 0.1}, (0.1, "shared.weight", ".*encoder.*")),
        # A regex on one alias beats a plain name on another.
        ("t5", {"shared": 0.0, r"lm_head\..*": 0.7}, (0.7, "shared.weight", r"lm_head\..*")),
        # BART: model.shared.weight = model.encoder/decoder.embed_tokens.weight = lm_head.weight.
        ("bart", {"encoder": 0.1, "decoder": 0.2}, (0.1, "model.shared.weight", "encoder")),
        (
            "bart",
            {"model.shared": 0.0, "encoder": 0.1, "decoder": 0.2},
            (0.0, "model.shared.weight", "model.shared"),
        ),
        ("bart", {"lm_head": 0.4}, (0.4, "model.shared.weight", "lm_head")),
        (
            "bart",
            {"decoder.embed_tokens": 0.3},
            (0.3, "model.shared.weight", "decoder.embed_tokens"),
        ),
        # bert2bert: the decoder's word embeddings are tied to its LM head (cls...decoder).
        (
            "bert2bert",
            {"decoder": 0.2, "cls": 0.3},
            (0.3, "decoder.bert.embeddings.word_embeddings.weight", "cls"),
        ),
        (
            "bert2bert",
            {"decoder": 0.2},
            (0.2, "decoder.bert.embeddings.word_embeddings.weight", "decoder"),
        ),
        # LoRA: the frozen tied embedding is still resolved (the optimizer ignores it).
        (
            "lora_t5",
            {"encoder": 0.1, "decoder": 0.2},
            (0.1, "base_model.model.shared.weight", "encoder"),
        ),
    ],
)
def test_tied_parameters_get_one_rate(
    models: dict[str, nn.Module],
    model_key: str,
    patterns: dict[str, float],
    expected: tuple[float, str, str],
) -> None:
    tensor = _model(models, model_key).get_parameter(expected[1])  # the canonical name
    named = _named(models, model_key)
    aliases = [name for name, p in named if p is tensor]
    assert len(aliases) >= 2  # really tied
    resolved = resolve_pattern_rates(named, patterns)
    assert resolved[tensor] == expected
    assert isinstance(resolved[tensor], tuple)


# --------------------------------------------------------------------------------------------
# Per-name expectations on BART, bert2bert, LoRA-T5 and a plain torch model
# --------------------------------------------------------------------------------------------

_BART_TIED = {
    "model.shared.weight",
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
}
_B2B_TIED_W = {
    "decoder.bert.embeddings.word_embeddings.weight",
    "decoder.cls.predictions.decoder.weight",
}
_LORA_TIED = {
    "base_model.model.shared.weight",
    "base_model.model.encoder.embed_tokens.weight",
    "base_model.model.decoder.embed_tokens.weight",
    "base_model.model.lm_head.weight",
}


def _by_prefix(
    *pairs: tuple[str, float], tied: frozenset[str] | set[str] = frozenset(), tied_rate: float = 0.0
) -> Callable[[str], float | None]:
    """Expected rate: ``tied_rate`` for the tied names, else that of the first matching prefix."""

    def expected(name: str) -> float | None:
        if name in tied:
            return tied_rate
        return next((rate for prefix, rate in pairs if name.startswith(prefix)), None)

    return expected


_T5_TIED = {
    "shared.weight",
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "lm_head.weight",
}


def _t5_three_way(name: str) -> float | None:
    """``{"SelfAttention": 0.1, "q": 0.3, "encoder": 0.05}``: depth 5 > 4 > 0."""
    if name.endswith(".q.weight"):  # SelfAttention.q and EncDecAttention.q
        return 0.3
    if ".SelfAttention." in name:
        return 0.1
    if name.startswith("encoder.") or name in _T5_TIED:
        return 0.05
    return None


PER_NAME_CASES = [
    # --- BART -------------------------------------------------------------------------------
    pytest.param(
        "bart",
        {"encoder": 0.1, "decoder": 0.2},
        _by_prefix(
            ("model.encoder.", 0.1), ("model.decoder.", 0.2), tied=_BART_TIED, tied_rate=0.1
        ),
        id="bart-enc-dec",
    ),
    pytest.param(
        "bart",
        {"model.shared": 0.0, "encoder": 0.1, "decoder": 0.2},
        _by_prefix(
            ("model.encoder.", 0.1), ("model.decoder.", 0.2), tied=_BART_TIED, tied_rate=0.0
        ),
        id="bart-shared-override",
    ),
    pytest.param(
        "bart",
        {"decoder": 0.2, r".*_proj\.bias": 0.0},
        lambda n: (
            0.0
            if n.endswith("_proj.bias")
            else (0.2 if n.startswith("model.decoder.") or n in _BART_TIED else None)
        ),
        id="bart-regex-beats-plain",
    ),
    pytest.param(
        "bart",
        {"self_attn": 0.1, "encoder_attn": 0.3},
        lambda n: 0.1 if ".self_attn." in n else (0.3 if ".encoder_attn." in n else None),
        id="bart-mid-name-plain",
    ),
    pytest.param(
        "bart",
        {"encoder": 0.1, "decoder": 0.2, "layers.0.fc1": 0.5},
        lambda n: (
            0.5
            if ".layers.0.fc1." in n
            else _by_prefix(
                ("model.encoder.", 0.1), ("model.decoder.", 0.2), tied=_BART_TIED, tied_rate=0.1
            )(n)
        ),
        id="bart-more-components",
    ),
    # --- bert2bert: the decoder contains a submodule named ``encoder`` -----------------------
    pytest.param(
        "bert2bert",
        {"encoder": 0.1, "decoder": 0.2},
        _by_prefix(("encoder.", 0.1), ("decoder.", 0.2)),
        id="b2b-enc-dec",
    ),
    pytest.param(
        "bert2bert",
        {"encoder": 0.1, "decoder": 0.2, "decoder.bert.encoder": 0.3},
        _by_prefix(("encoder.", 0.1), ("decoder.bert.encoder.", 0.3), ("decoder.", 0.2)),
        id="b2b-nested-override",
    ),
    pytest.param(
        "bert2bert",
        {"decoder": 0.2, "cls": 0.3},
        _by_prefix(("decoder.cls.", 0.3), ("decoder.", 0.2), tied=_B2B_TIED_W, tied_rate=0.3),
        id="b2b-narrower-wins",
    ),
    pytest.param(
        "bert2bert",
        {".*attention.*": 0.5},
        lambda n: 0.5 if "attention" in n else None,
        id="b2b-regex-attention",
    ),
    pytest.param(
        "bert2bert",
        {"(?i).*ATTENTION.*": 0.5},
        lambda n: 0.5 if "attention" in n else None,
        id="b2b-regex-ignorecase",
    ),
    pytest.param(
        "bert2bert",
        {"attention": 0.5, "crossattention": 0.6},
        lambda n: 0.6 if ".crossattention." in n else (0.5 if ".attention." in n else None),
        id="b2b-component-boundary",
    ),
    # --- PEFT LoRA-wrapped T5: names start with base_model.model. ----------------------------
    pytest.param(
        "lora_t5",
        {"encoder": 0.1, "decoder": 0.2},
        _by_prefix(
            ("base_model.model.encoder.", 0.1),
            ("base_model.model.decoder.", 0.2),
            tied=_LORA_TIED,
            tied_rate=0.1,
        ),
        id="lora-enc-dec",
    ),
    pytest.param(
        "lora_t5",
        {"lora_A": 0.1, "lora_B": 0.2},
        lambda n: 0.1 if ".lora_A." in n else (0.2 if ".lora_B." in n else None),
        id="lora-adapters",
    ),
    pytest.param(
        "lora_t5",
        {"encoder": 0.1, ".*lora_B.*": 0.5},
        lambda n: (
            0.5
            if ".lora_B." in n
            else (0.1 if n.startswith("base_model.model.encoder.") or n in _LORA_TIED else None)
        ),
        id="lora-regex-beats-plain",
    ),
    pytest.param(
        # 3 components beat 2: the full PEFT path outranks SelfAttention.q inside the decoder.
        "lora_t5",
        {"base_model.model.decoder": 0.2, "SelfAttention.q": 0.3},
        lambda n: (
            0.2
            if n.startswith("base_model.model.decoder.") or n in _LORA_TIED
            else (0.3 if ".SelfAttention.q." in n else None)
        ),
        id="lora-full-prefix",
    ),
    # --- T5: equal components, the name living deeper in the model wins ---------------------
    pytest.param(
        "t5",
        {"block": 0.1, "layer": 0.2},
        lambda n: 0.2 if ".block." in n else None,
        id="t5-deeper-name-wins",
    ),
    pytest.param(
        "t5",
        {"SelfAttention": 0.1, "q": 0.3, "encoder": 0.05},
        _t5_three_way,
        id="t5-three-way",
    ),
    # --- plain torch: component boundaries ---------------------------------------------------
    pytest.param(
        "toy",
        {"encoder": 0.1},
        _by_prefix(("encoder.", 0.1), ("model.encoder.", 0.1), ("head.weight", 0.1)),
        id="toy-boundaries",
    ),
    pytest.param(
        "toy",
        {"encoder.block.0": 0.3},
        _by_prefix(("encoder.block.0.", 0.3)),
        id="toy-block0-not-block01",
    ),
    pytest.param("toy", {"block.0": 0.3}, _by_prefix(("encoder.block.0.", 0.3)), id="toy-mid-name"),
    pytest.param(
        "toy",
        {"scale": 0.5, "bias": 0.0},
        lambda n: 0.5 if n == "scale" else (0.0 if n.endswith(".bias") else None),
        id="toy-parameter-level",
    ),
    pytest.param(
        "toy",
        {"encoder": 0.1, "encoder.block.1.weight": 0.9},
        lambda n: (
            0.9
            if n in {"encoder.block.1.weight", "head.weight"}
            else (0.1 if n.startswith(("encoder.", "model.encoder.")) else None)
        ),
        id="toy-exact-parameter",
    ),
    pytest.param(
        # encoder.block.1.weight is head.weight; both names live at depth 0: the first alias.
        "toy",
        {"head": 0.7, "encoder": 0.1},
        lambda n: (
            0.7
            if n == "head.bias"
            else (0.1 if n.startswith(("encoder.", "model.encoder.", "head.weight")) else None)
        ),
        id="toy-tied-first-alias",
    ),
    pytest.param(
        # model.encoder: ``encoder`` also lives at depth 0, so the enclosing ``model`` wins.
        "toy",
        {"encoder": 0.1, "model": 0.2},
        lambda n: (
            0.2
            if n.startswith("model.")
            else (0.1 if n.startswith(("encoder.", "head.weight")) else None)
        ),
        id="toy-equal-depth-nearer-root",
    ),
    pytest.param(
        "toy",
        {"encoder": 0.1, r"encoder\.block\.0.*": 0.2},
        # A regex is not component-wise: encoder.block.01 matches too.
        lambda n: (
            0.2
            if n.startswith(("encoder.block.0.", "encoder.block.01."))
            else (0.1 if n.startswith(("encoder.", "model.encoder.", "head.weight")) else None)
        ),
        id="toy-regex-no-boundaries",
    ),
]


@pytest.mark.parametrize(("model_key", "patterns", "expected"), PER_NAME_CASES)
def test_rate_per_name(
    models: dict[str, nn.Module],
    model_key: str,
    patterns: dict[str, float],
    expected: Callable[[str], float | None],
) -> None:
    named = _named(models, model_key)
    resolved = resolve_pattern_rates(named, patterns)
    assert _rates_by_name(named, resolved) == {name: expected(name) for name, _ in named}


@pytest.mark.parametrize("model_key", ["t5", "bart", "bert2bert", "lora_t5", "toy"])
def test_mapping_order_does_not_matter(models: dict[str, nn.Module], model_key: str) -> None:
    named = _named(models, model_key)
    components = {n.split(".")[i] for n, _ in named for i in range(min(3, n.count(".")))}
    chosen = sorted(c for c in components if not c.isdigit())[:6]
    forward = {c: (i + 1) / 10 for i, c in enumerate(chosen)}
    backward = dict(reversed(list(forward.items())))
    assert resolve_pattern_rates(named, forward) == resolve_pattern_rates(named, backward)


def test_same_rate_regexes_agree_first_in_order_is_reported(models: dict[str, nn.Module]) -> None:
    t5 = _model(models, "t5")
    named = _named(models, "t5")
    q = t5.encoder.block[0].layer[0].SelfAttention.q.weight
    resolved = resolve_pattern_rates(named, {".*SelfAttention.*": 0.3, r".*\.q\..*": 0.3})
    assert resolved[q].rate == 0.3 and resolved[q].pattern == ".*SelfAttention.*"
    resolved = resolve_pattern_rates(named, {r".*\.q\..*": 0.3, ".*SelfAttention.*": 0.3})
    assert resolved[q].pattern == r".*\.q\..*"


def test_regex_beats_longer_plain_name(models: dict[str, nn.Module]) -> None:
    t5 = _model(models, "t5")
    named = _named(models, "t5")
    q = t5.encoder.block[0].layer[0].SelfAttention.q.weight
    patterns = {"encoder.block.0.layer.0.SelfAttention.q.weight": 0.9, ".*SelfAttention.*": 0.3}
    assert resolve_pattern_rates(named, patterns)[q] == (
        0.3,
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        ".*SelfAttention.*",
    )


def test_empty_patterns_and_generator_input(models: dict[str, nn.Module]) -> None:
    t5 = _model(models, "t5")
    assert resolve_pattern_rates(t5.named_parameters(remove_duplicate=False), {}) == {}
    resolved = resolve_pattern_rates(t5.named_parameters(remove_duplicate=False), {"lm_head": 1})
    assert resolved == {t5.shared.weight: (1.0, "shared.weight", "lm_head")}
    assert type(resolved[t5.shared.weight].rate) is float


# --------------------------------------------------------------------------------------------
# Errors: every message names the argument and the pattern, and helps
# --------------------------------------------------------------------------------------------

ERROR_CASES = [
    # (model, patterns, argument, exception, substrings the message must contain)
    (
        "t5",
        {"encodr": 0.1},
        "params",
        ValueError,
        ["params", "'encodr'", "'encoder'", "plain name"],
    ),
    (
        "t5",
        {"SelfAtention": 0.1},
        "dropgrad_module_rates",
        ValueError,
        ["dropgrad_module_rates", "'SelfAtention'", "'SelfAttention'"],
    ),
    (
        "t5",
        {".*SelfAtention.*": 0.1},
        "params",
        ValueError,
        ["'.*SelfAtention.*'", "'SelfAttention'"],
    ),
    (
        "t5",
        {".*SelfAttention": 0.1},
        "params",
        ValueError,
        ["params", "'.*SelfAttention'", "module", r"'.*SelfAttention\..*'"],
    ),
    ("t5", {"pre_encoder": 0.1}, "params", ValueError, ["'pre_encoder'", "'encoder'"]),
    ("t5", {"encoderx": 0.1}, "params", ValueError, ["'encoderx'", "'encoder'"]),
    (
        "t5",
        {"decoder.embed_token": 0.1},
        "params",
        ValueError,
        ["'decoder.embed_token'", "'decoder.embed_tokens'"],
    ),
    ("t5", {"xyzzy": 0.1}, "params", ValueError, ["'xyzzy'", "'shared'", "'encoder'", "'lm_head'"]),
    (
        "t5",
        {"encodr": 0.1, "encoder": 0.1, "decodr": 0.2},
        "params",
        ValueError,
        ["2 patterns", "'encodr'", "'decodr'", "'encoder'", "'decoder'"],
    ),
    (
        "toy",
        {"encoder.block.00": 0.1},
        "params",
        ValueError,
        ["'encoder.block.00'", "'encoder.block.0'"],
    ),
    ("toy", {"pre_encode": 0.1}, "params", ValueError, ["'pre_encode'", "'pre_encoder'"]),
    ("lora_t5", {"encodr": 0.1}, "params", ValueError, ["'encodr'", "'encoder'"]),
    ("lora_t5", {"lora_a": 0.1}, "params", ValueError, ["'lora_a'", "'lora_A'"]),
    ("bart", {"model.encodr": 0.1}, "params", ValueError, ["'model.encodr'", "'model.encoder'"]),
    (
        "bert2bert",
        {"crossatention": 0.1},
        "dropgrad_module_rates",
        ValueError,
        ["dropgrad_module_rates", "'crossatention'", "'crossattention'"],
    ),
    (
        "t5",
        {"*encoder*": 0.1},
        "params",
        ValueError,
        ["params", "'*encoder*'", "regular expression", "'.*encoder.*'"],
    ),
    (
        "t5",
        {"encoder[": 0.1},
        "dropgrad_module_rates",
        ValueError,
        ["dropgrad_module_rates", "'encoder['", "regular expression"],
    ),
    (
        "t5",
        {".*SelfAttention.*": 0.1, r".*\.q\..*": 0.2},
        "params",
        ValueError,
        [
            "params",
            "'.*SelfAttention.*'",
            r"'.*\.q\..*'",
            "'encoder.block.0.layer.0.SelfAttention.q.weight'",
            "different rates",
        ],
    ),
    (
        # A real clash: BART's decoder cross-attention is called encoder_attn.
        "bart",
        {".*encoder.*": 0.1, ".*decoder.*": 0.2},
        "dropgrad_module_rates",
        ValueError,
        [
            "dropgrad_module_rates",
            "'.*encoder.*'",
            "'.*decoder.*'",
            "'model.decoder.layers.0.encoder_attn.k_proj.weight'",
        ],
    ),
    ("t5", {"encoder..block": 0.1}, "params", ValueError, ["params", "'encoder..block'", "empty"]),
    ("t5", {"encoder.": 0.1}, "params", ValueError, ["params", "'encoder.'", "empty"]),
    ("t5", {"": 0.1}, "params", ValueError, ["params", "empty pattern"]),
    ("t5", {3: 0.1}, "params", TypeError, ["params", "str", "int"]),
    (
        "t5",
        {("encoder",): 0.1},
        "dropgrad_module_rates",
        TypeError,
        ["dropgrad_module_rates", "tuple"],
    ),
]


@pytest.mark.parametrize(("model_key", "patterns", "argument", "exc", "needles"), ERROR_CASES)
def test_error_messages(
    models: dict[str, nn.Module],
    model_key: str,
    patterns: dict,
    argument: str,
    exc: type[Exception],
    needles: Sequence[str],
) -> None:
    named = _named(models, model_key)
    with pytest.raises(exc) as info:
        resolve_pattern_rates(named, patterns, argument=argument)
    message = str(info.value)
    missing = [needle for needle in needles if needle not in message]
    assert not missing, f"{missing} not in message:\n{message}"
    assert message.startswith(f"{argument}:")


def test_parameter_key_is_a_type_error_without_tensor_dump(models: dict[str, nn.Module]) -> None:
    t5 = _model(models, "t5")
    with pytest.raises(
        TypeError, match=r"^params: pattern keys must be str, got Parameter"
    ) as info:
        resolve_pattern_rates(_named(models, "t5"), {t5.shared.weight: 0.1})
    assert "tensor(" not in str(info.value)


def test_pattern_matching_only_an_alias_is_not_an_error(models: dict[str, nn.Module]) -> None:
    t5 = _model(models, "t5")
    canonical_only = list(t5.named_parameters())  # no aliases: lm_head/embed_tokens are gone
    with pytest.raises(ValueError, match="'lm_head'"):
        resolve_pattern_rates(canonical_only, {"lm_head": 0.1})
    resolved = resolve_pattern_rates(_named(models, "t5"), {"lm_head": 0.1})
    assert list(resolved) == [t5.shared.weight]


# --------------------------------------------------------------------------------------------
# format_rate_table
# --------------------------------------------------------------------------------------------


def _rows(model: nn.Module, named: Named, patterns: dict[str, float], numel: bool = True) -> list:
    resolved = resolve_pattern_rates(named, patterns)
    rows = []
    for name, p in model.named_parameters():
        r = resolved.get(p)
        row = (name, r.rate if r else None, r.pattern if r else None)
        rows.append((*row, p.numel()) if numel else row)
    return rows


def test_table_short_lists_every_parameter(models: dict[str, nn.Module]) -> None:
    toy = _model(models, "toy")
    rows = _rows(toy, _named(models, "toy"), {"encoder": 0.1, "encoder.block.0": 0.25})
    table = format_rate_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["parameter", "rate", "pattern", "elements"]
    assert len(lines) == len(rows) + 2
    by_name = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert by_name["encoder.block.0.weight"] == ["0.25", "encoder.block.0", "4"]
    assert by_name["encoder.block.01.bias"] == ["0.1", "encoder", "2"]
    assert by_name["pre_encoder.weight"] == ["-", "-", "4"]
    assert by_name["scale"] == ["-", "-", "2"]
    # Right-aligned rate column: every rate ends where the header's "rate" ends.
    end = lines[0].index("rate") + len("rate")
    for line, row in zip(lines[1:-1], rows, strict=True):
        cell = "-" if row[1] is None else f"{row[1]:g}"
        assert line[end - len(cell) : end] == cell, line
    n_rated = sum(r[1] is not None for r in rows)
    total = sum(r[3] for r in rows)
    assert lines[-1] == (
        f"{len(rows)} parameters ({total} elements): {n_rated} with a drop rate, "
        f"{len(rows) - n_rated} without"
    )


def test_table_without_element_counts(models: dict[str, nn.Module]) -> None:
    toy = _model(models, "toy")
    rows = _rows(toy, _named(models, "toy"), {"encoder": 0.1}, numel=False)
    lines = format_rate_table(rows).splitlines()
    assert lines[0].split() == ["parameter", "rate", "pattern"]
    assert "elements" not in lines[-1]


def test_table_long_collapses_to_groups(models: dict[str, nn.Module]) -> None:
    t5 = _model(models, "t5_6")
    patterns = {"encoder": 0.1, "decoder": 0.2, "encoder.block.0": 0.3, ".*SelfAttention.*": 0.5}
    rows = _rows(t5, list(t5.named_parameters(remove_duplicate=False)), patterns)
    assert len(rows) > 100
    table = format_rate_table(rows, max_rows=20)
    lines = table.splitlines()
    groups = Counter((r[1], r[2]) for r in rows)
    elements = Counter()
    for r in rows:
        elements[(r[1], r[2])] += r[3]
    assert len(lines) == len(groups) + 2 <= 22
    assert lines[0].split() == ["rate", "pattern", "parameters", "elements", "names"]
    for line in lines[1:-1]:
        rate, pattern, count, numel, *_ = line.split()
        key = (float(rate), pattern)
        assert int(count.replace(",", "")) == groups[key]
        assert int(numel.replace(",", "")) == elements[key]
    assert sum(groups.values()) == len(rows)
    assert lines[-1].startswith(f"{len(rows)} parameters ({sum(elements.values()):,} elements)")


def test_table_more_groups_than_rows(models: dict[str, nn.Module]) -> None:
    rows = [(f"layer.{i}.weight", i / 100, f"layer.{i}", 10) for i in range(12)]
    rows.append(("head.weight", None, None, 5))
    lines = format_rate_table(rows, max_rows=4).splitlines()
    assert len(lines) == 4 + 2
    assert "(10 more groups)" in lines[-2]
    assert lines[-2].split()[-2:] == ["10", "95"]  # 10 parameters, 95 elements left over
    assert lines[-1] == "13 parameters (125 elements): 12 with a drop rate, 1 without"


def test_table_edge_cases() -> None:
    assert format_rate_table([]).splitlines()[-1] == "0 parameters: 0 with a drop rate, 0 without"
    with pytest.raises(ValueError, match="max_rows"):
        format_rate_table([("w", 0.1, "w")], max_rows=0)


# --------------------------------------------------------------------------------------------
# Module hygiene
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("  ", None),
        ({}, None),
        ("encoder=0.1", {"encoder": 0.1}),
        (" encoder = 0.1 , decoder=1 ,", {"encoder": 0.1, "decoder": 1.0}),
        ("encoder.block.0=0.3,encoder=1e-1", {"encoder.block.0": 0.3, "encoder": 0.1}),
        (r"layer\.\d{1,2}\.x=0.2", {r"layer\.\d{1,2}\.x": 0.2}),
        ("(a|b,c).*=0.2,d=0.1", {"(a|b,c).*": 0.2, "d": 0.1}),
        ("[,(]x=0.2,d=0.1", {"[,(]x": 0.2, "d": 0.1}),
        ("[],]x=0.2,d=0.1", {"[],]x": 0.2, "d": 0.1}),
        (r"a\,b=0.2,d=0.1", {r"a\,b": 0.2, "d": 0.1}),
        ("(?=x).*=0.5", {"(?=x).*": 0.5}),
        ('  {"x": 0.5, ".*attention.*": "0.25"}', {"x": 0.5, ".*attention.*": 0.25}),
        ({"encoder": 1, " decoder ": "0.2"}, {"encoder": 1.0, "decoder": 0.2}),
    ],
)
def test_parse_module_rates_accepts(value, expected) -> None:
    parsed = parse_module_rates(value)
    assert parsed == expected
    if parsed is not None:
        assert list(parsed) == list(expected)  # order kept
        assert all(type(v) is float for v in parsed.values())


@pytest.mark.parametrize(
    "value, message",
    [
        (3, r"^--dropgrad_module_rates: got int 3\. Expected"),
        ("encoder", r"'encoder' is not a PATTERN=RATE pair"),
        ("=0.1", r"'=0.1' is not a PATTERN=RATE pair"),
        ("a=0.1,a=0.2", r"pattern 'a' is given more than once"),
        ('{"a": 0.1, "a": 0.2}', r"pattern 'a' is given more than once"),
        ("{not json", r"is not a valid JSON object"),
        ({"": 0.1}, r"patterns must be non-empty strings"),
        ({"a": 0.1, " a ": 0.2}, r"pattern 'a' is given more than once"),
        ("a..b=0.1", r"plain name 'a\.\.b' has an empty component"),
        ("a=1.5", r"^--dropgrad_module_rates: the rate of 'a': must be a number in \[0, 1\]"),
        ({"a": True}, r"the rate of 'a': must be a number"),
    ],
)
def test_parse_module_rates_rejects(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_module_rates(value)


def test_parse_rate_reads_text_and_numbers() -> None:
    assert parse_rate(" 1e-1 ", "--dropgrad_rate") == 0.1
    assert parse_rate(1, "--dropgrad_rate") == 1.0
    for bad in (True, "x", None, float("nan"), -0.1, "1.5"):
        with pytest.raises(ValueError, match=r"^r: must be a number in \[0, 1\]"):
            parse_rate(bad, "r")


def test_docstring_examples() -> None:
    result = doctest.testmod(patterns_module)
    assert result.attempted >= 3 and result.failed == 0


