"""The parts of a bridge a training run starts from: frozen vision tower and LLM, tokenizers, processor, and
a Bridge wired between them (its projection at the LLM's embedding scale, location rows at the LLM's
number rows). Shared by training (``training.train``) and quality scoring (``training.quality``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qformer.boxes import BoxCodec
from qformer.bridge import Bridge, load_llm, load_vision_encoder, vision_hidden_size
from qformer.config import BridgeConfig, QFormerConfig
from qformer.prompts import preset
from training.config import TrainConfig

DEC_TOKEN = "[DEC]"
# What stage 1 trains and writes (training.train); the LLM-side parts come with stage 2.
STAGE1_PARTS = ("ln_vision", "qformer")


@dataclass
class Parts:
    bridge: Bridge
    tokenizer: object | None  # LLM tokenizer (stage 2)
    qformer_tokenizer: object
    image_processor: object


def _alignment_config(init_from: str) -> QFormerConfig | None:
    """The frozen stage-1 copy's Q-Former config that a stage 2 keeps from ``init_from``: a stage-1 run's own
    (with its text branch), or what a stage-2 run being continued already carries (None: the trained one's)."""
    stage1 = Path(init_from) / "final" / "bridge_config.json"
    if stage1.is_file():
        return QFormerConfig(**json.loads(stage1.read_text())["qformer"])
    stage2 = Path(init_from) / "bundle" / "qbridge.json"
    if stage2.is_file():
        return BridgeConfig.from_dict(json.loads(stage2.read_text())["config"]).alignment_qformer_config
    return None


def build_parts(cfg: TrainConfig, with_llm: bool) -> Parts:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    m = cfg.model
    vision = load_vision_encoder(m.vision)
    image_processor = AutoImageProcessor.from_pretrained(m.vision)
    llm = load_llm(m.llm) if with_llm else None
    tokenizer = AutoTokenizer.from_pretrained(m.llm) if m.llm else None
    qtok = AutoTokenizer.from_pretrained(m.qformer_tokenizer or m.llm)
    if DEC_TOKEN not in qtok.get_vocab():
        qtok.add_special_tokens({"additional_special_tokens": [DEC_TOKEN]}, replace_extra_special_tokens=False)
    if qtok.pad_token is None:
        qtok.pad_token = qtok.eos_token
    qtok.padding_side = "right"  # the [CLS] feature and the [DEC] start token sit at position 0
    base_vocab = 0
    if llm is not None:
        base_vocab = llm.get_input_embeddings().num_embeddings
        if m.num_loc_bins:
            if len(tokenizer) != base_vocab:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the LLM {base_vocab}; location ids would clash")
            tokenizer.add_tokens(BoxCodec(m.num_loc_bins).tokens())
    llm_hidden = AutoConfig.from_pretrained(m.llm).get_text_config().hidden_size if m.llm else 0
    alignment = with_llm and m.keep_alignment  # the stage-1 copy does ITC/ITM; the trained Q-Former needs no text
    qcfg = QFormerConfig(
        **{**m.qformer, "encoder_hidden_size": vision_hidden_size(vision), "vocab_size": len(qtok),
           "pad_token_id": qtok.pad_token_id, **({"with_text": False} if alignment else {})}
    )
    align_cfg = _alignment_config(m.init_from) if alignment and m.init_from else None
    bcfg = BridgeConfig(
        qformer=qcfg,
        vision_hidden_size=vision_hidden_size(vision),
        llm_hidden_size=llm_hidden or qcfg.hidden_size,
        num_quality_levels=m.num_quality_levels,
        quality_prompt_len=m.quality_prompt_len,
        quality_names=tuple(m.quality_names),
        num_loc_bins=m.num_loc_bins if llm is not None else 0,
        base_vocab_size=base_vocab,
        prompts=preset(m.prompts),
        alignment_qformer=alignment,
        alignment_qformer_config=align_cfg,
    )
    bridge = Bridge(bcfg, vision, llm)
    if llm is not None:
        match_llm_embedding_scale(bridge)
        if bcfg.num_loc_bins:
            init_location_rows_from_numbers(bridge, tokenizer)
    return Parts(bridge, tokenizer, qtok, image_processor)


@torch.no_grad()
def match_llm_embedding_scale(bridge: Bridge) -> None:
    """Start the projection at the scale of the LLM's own token embeddings.

    The Q-Former's output is LayerNorm-ed (about unit size per dimension); a default-initialised Linear
    maps it to vectors far larger than a small LLM's token embeddings (measured on the demo: norm 18 vs
    0.34), and the frozen LLM then learns to ignore the prefix. With weights of std
    rms(embeddings) / sqrt(H), the queries enter at the size of ordinary tokens.
    """
    emb = bridge.llm.get_input_embeddings().weight.float()
    rms = emb.pow(2).mean().sqrt().item()
    proj = bridge.language_projection
    proj.weight.normal_(0.0, rms / proj.in_features**0.5)
    proj.bias.zero_()
    if bridge.quality_prompts is not None:
        bridge.quality_prompts.normal_(0.0, rms)


@torch.no_grad()
def init_location_rows_from_numbers(bridge: Bridge, tokenizer) -> bool:
    """Start `<loc_i>`'s input and output rows at the LLM's own rows for the number " i", when every bin's
    number is one token of its vocabulary (the demo LLM was pretrained reading and writing boxes as such
    numbers: `training.demo.pretrain.detection_text`); otherwise the rows keep the Bridge's neutral mean init.
    Returns whether the rows were copied."""
    n = bridge.cfg.num_loc_bins
    ids = [tokenizer(f" {i}", add_special_tokens=False).input_ids for i in range(n)]
    if any(len(x) != 1 or x[0] >= bridge.cfg.base_vocab_size for x in ids):
        return False
    rows = torch.tensor([x[0] for x in ids])
    bridge.loc_embeddings.copy_(bridge.llm.get_input_embeddings().base.weight[rows].float())
    bridge.loc_head.copy_(bridge.llm.get_output_embeddings().base.weight[rows].float())
    return True
