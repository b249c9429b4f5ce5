"""GPT-2 split for language modelling, fine-tuned with LoRA on the attention query and value.

Client = token + position embeddings + the first ``client_layers`` blocks; server = the other
blocks + final LayerNorm + LM head; aux = ``aux_layers`` fresh blocks + LayerNorm + LM head. The
LM heads are frozen copies of the token embedding (GPT-2 ties them; the embedding is frozen,
so the copies never drift apart). In client and server only the LoRA weights train, so only
they are communicated. The aux model is small and starts from random blocks, so it trains
fully (as in the FSL-SAGE reference code), all but its frozen head.

``transformers`` and ``peft`` are imported only when a GPT-2 is built: they are slow to import
and nothing else needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fslsage.data.base import LANGUAGE_MODELING, DatasetInfo
from fslsage.models.base import MODELS, SplitModel
from fslsage.models.common import incompatible

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel

GPT2_MEDIUM = {"n_layer": 24, "n_embd": 1024, "n_head": 16}
LORA_TARGETS = r".*\.c_attn\.[qv]"  # the query and value Linear of every QKV below


class QKV(nn.Module):
    """GPT-2's fused query/key/value projection (a Conv1D with weight (d_in, 3·d)) as three
    nn.Linear ``q``, ``k``, ``v`` so that LoRA can target the query and value alone. The output
    is the fused layout, so GPT2Attention runs unchanged."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        weight, bias = fused.weight.detach(), fused.bias.detach()
        d = weight.shape[1] // 3
        self.q, self.k, self.v = (
            _linear(weight[:, i * d : (i + 1) * d].T, bias[i * d : (i + 1) * d]) for i in range(3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of ``weight`` (out, in) and ``bias``, built without the
    throw-away random initialisation."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone().contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone())
    return linear


def _frozen_head(wte: nn.Embedding) -> nn.Linear:
    """An LM head tied to a frozen copy of the token embedding."""
    head = _linear(wte.weight, None)
    head.weight.requires_grad_(False)
    return head


def _causal_mask(blocks: nn.ModuleList, h: Tensor) -> Tensor | None:
    """The additive (1, 1, T, T) causal mask, or None where attention is SDPA: then transformers
    sets ``is_causal`` itself (and GPUs can use flash attention). Eager attention in recent
    transformers only masks what it is given, since GPT2Model normally builds the mask."""
    config = getattr(blocks[0].attn, "config", None) if len(blocks) else None
    if getattr(config, "_attn_implementation", "eager") == "sdpa":
        return None
    t = h.shape[1]
    mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device)
    return torch.triu(mask, diagonal=1)[None, None]


def _run_blocks(blocks: nn.ModuleList, h: Tensor) -> Tensor:
    mask = _causal_mask(blocks, h)
    for block in blocks:
        out = block(h, attention_mask=mask)
        h = out[0] if isinstance(out, tuple) else out  # a tuple before transformers 5
    return h


class GPT2Client(nn.Module):
    """input_ids (B, T) → hidden states (B, T, d) after the first blocks."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module, blocks: list):
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop
        self.blocks = nn.ModuleList(blocks)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.drop(self.wte(input_ids) + self.wpe(positions))
        return _run_blocks(self.blocks, h)


class GPT2Head(nn.Module):
    """hidden states (B, T, d) → blocks → LayerNorm → logits (B, T, vocab): server and aux."""

    def __init__(self, blocks: list, ln_f: nn.LayerNorm, lm_head: nn.Linear):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, h: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(_run_blocks(self.blocks, h)))


def add_lora(part: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """LoRA (through peft) on the query and value projections of every block of ``part``;
    everything else in ``part`` is frozen."""
    blocks = part.blocks
    for block in blocks:
        block.attn.c_attn = QKV(block.attn.c_attn)
    if len(blocks):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS
        )
        inject_adapter_in_model(config, part)
    for name, param in part.named_parameters():
        param.requires_grad_("lora_" in name)
    return part


def split_gpt2(
    lm: GPT2LMHeadModel,
    client_layers: int = 1,
    aux_layers: int = 3,
    lora_rank: int = 4,
    lora_alpha: float = 32,
    lora_dropout: float = 0.1,
) -> SplitModel:
    """Splits a GPT2LMHeadModel (whose modules it takes over) into client, server and aux."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config, tr = lm.config, lm.transformer
    if not 0 <= client_layers <= config.n_layer:
        raise ValueError(f"model 'gpt2': client_layers must be in 0..{config.n_layer} (n_layer)")
    if aux_layers < 0 or lora_rank < 1 or not 0 <= lora_dropout < 1:
        raise ValueError(
            "model 'gpt2': need aux_layers >= 0, lora_rank >= 1, 0 <= lora_dropout < 1"
        )
    blocks = list(tr.h)
    client = GPT2Client(tr.wte, tr.wpe, tr.drop, blocks[:client_layers])
    server = GPT2Head(blocks[client_layers:], tr.ln_f, _frozen_head(tr.wte))
    aux_blocks = nn.ModuleList(GPT2Block(config, layer_idx=i) for i in range(aux_layers))
    aux_blocks.apply(lm._init_weights)  # GPT-2's initialisation, as the pretrained ones had
    ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
    aux = GPT2Head(list(aux_blocks), ln, _frozen_head(tr.wte))
    for part in (client, server):
        add_lora(part, lora_rank, lora_alpha, lora_dropout)
    return SplitModel(client, server, aux)


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def _load_lm(info: DatasetInfo, pretrained: str | None, arch: dict[str, int | None]):
    """A GPT2LMHeadModel: random GPT-2 (medium unless ``arch`` says otherwise) sized for the
    dataset, or pretrained weights from a local directory / the HF cache (never downloaded).
    Under ``torch.device("meta")`` a pretrained model is built from its config alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, seq_len = info.num_classes, info.input_shape[0]
    if pretrained is None:
        sizes = {k: GPT2_MEDIUM[k] if v is None else v for k, v in arch.items()}
        if sizes["n_embd"] % sizes["n_head"]:
            raise ValueError(f"model 'gpt2': n_embd must be a multiple of n_head, got {sizes}")
        special = min(50256, vocab - 1)  # GPT-2's <|endoftext|> id, kept inside the vocabulary
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=seq_len,
            bos_token_id=special,
            eos_token_id=special,
            **sizes,
        )
        return GPT2LMHeadModel(config)
    try:
        config = GPT2Config.from_pretrained(pretrained, local_files_only=True)
    except OSError as err:
        raise ValueError(f"model 'gpt2': cannot load pretrained={pretrained!r}: {err}") from None
    _check_pretrained(info, pretrained, config, arch)
    if _on_meta():
        return GPT2LMHeadModel(config)
    return GPT2LMHeadModel.from_pretrained(pretrained, local_files_only=True).float()


def _check_pretrained(
    info: DatasetInfo, pretrained: str, config: GPT2Config, arch: dict[str, int | None]
) -> None:
    if config.vocab_size != info.num_classes:
        raise incompatible(
            "gpt2", info, f"pretrained {pretrained!r} has a vocabulary of {config.vocab_size}"
        )
    if info.input_shape[0] > config.n_positions:
        raise incompatible(
            "gpt2", info, f"pretrained {pretrained!r} takes at most {config.n_positions} tokens"
        )
    clash = {k: v for k, v in arch.items() if v is not None and v != getattr(config, k)}
    if clash:
        raise ValueError(
            f"model 'gpt2': {clash} contradict pretrained {pretrained!r} "
            f"({ {k: getattr(config, k) for k in clash} }); leave them unset"
        )


@MODELS.register("gpt2")
def gpt2(
    info: DatasetInfo,
    pretrained: str | None = None,
    n_layer: int | None = None,
    n_embd: int | None = None,
    n_head: int | None = None,
    client_layers: int = 1,
    aux_layers: int = 3,
    lora_rank: int = 4,
    lora_alpha: float = 32,
    lora_dropout: float = 0.1,
) -> SplitModel:
    """GPT-2 (medium by default: 24 blocks, d=1024, 16 heads) for a language-modelling dataset;
    vocabulary and context length come from the dataset, or from ``pretrained`` (a local
    directory or HF cache id, loaded without network) whose vocabulary must match."""
    if info.task != LANGUAGE_MODELING or len(info.input_shape) != 1:
        raise incompatible("gpt2", info, "needs a language-modelling dataset of (T,) token ids")
    arch = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}
    lm = _load_lm(info, pretrained, arch)
    return split_gpt2(lm, client_layers, aux_layers, lora_rank, lora_alpha, lora_dropout)
