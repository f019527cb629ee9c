"""Import from and export to transformers' `Blip2ForConditionalGeneration`.

    qbridge convert --from-hf-blip2 Salesforce/blip2-opt-2.7b --out bundles/blip2-opt-2.7b
    qbridge export-hf BUNDLE --out DIR

Key table (transformers -> bundle):
    query_tokens                       -> qformer.query_tokens
    qformer.{layernorm,encoder}.*      -> qformer.{layernorm,encoder}.*   (same names)
    vision_model.post_layernorm.*      -> ln_vision.*                      (BLIP-2's trainable ln_vision)
    language_projection.*              -> language_projection.*
    vision_model.*, language_model.*   -> embedded frozen components vision/, llm/

The bundle asks the converted model BLIP-2's own task prompts (the `blip2-opt` preset of qformer.prompts),
so it captions and answers as transformers' `generate` does with BLIP-2's documented prompts. Export writes
weights only: transformers' format has no place for prompts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
)

from qformer.bridge import Bridge, strip_blip2_post_layernorm
from qformer.bundle import Bundle, BundleError, load_bundle, refuse_pickles, save_bundle
from qformer.config import BridgeConfig, QFormerConfig
from qformer.prompts import preset


def qformer_config_from_hf(q: Blip2QFormerConfig, num_query_tokens: int) -> QFormerConfig:
    if getattr(q, "use_qformer_text_input", False):
        raise BundleError("Q-Formers with a text input (use_qformer_text_input=True) are not supported by convert")
    return QFormerConfig(
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        hidden_act=q.hidden_act,
        hidden_dropout_prob=q.hidden_dropout_prob,
        attention_probs_dropout_prob=q.attention_probs_dropout_prob,
        layer_norm_eps=q.layer_norm_eps,
        cross_attention_every=q.cross_attention_frequency,
        encoder_hidden_size=q.encoder_hidden_size,
        num_query_tokens=num_query_tokens,
        with_text=False,
        vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings,
        pad_token_id=q.pad_token_id,
    )


def qformer_config_to_hf(c: QFormerConfig) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act,
        hidden_dropout_prob=c.hidden_dropout_prob,
        attention_probs_dropout_prob=c.attention_probs_dropout_prob,
        layer_norm_eps=c.layer_norm_eps,
        cross_attention_frequency=c.cross_attention_every,
        encoder_hidden_size=c.encoder_hidden_size,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        pad_token_id=c.pad_token_id,
    )


def from_hf_blip2(model: Blip2ForConditionalGeneration) -> Bridge:
    """A Bridge sharing the vision tower and LLM of a transformers BLIP-2 model."""
    c = model.config
    if not c.use_decoder_only_language_model:
        raise BundleError("only decoder-only LLMs are supported (this checkpoint uses an encoder-decoder LM)")
    vision_eps = c.vision_config.layer_norm_eps
    cfg = BridgeConfig(
        qformer=qformer_config_from_hf(c.qformer_config, c.num_query_tokens),
        vision_hidden_size=c.vision_config.hidden_size,
        llm_hidden_size=c.text_config.hidden_size,
        vision_layer_norm_eps=vision_eps,
        base_vocab_size=model.language_model.get_input_embeddings().num_embeddings,
        image_token_index=c.image_token_index,
        # Only decoder-only LLMs convert (checked above), and BLIP-2 released those with OPT: its prompts are
        # also the best guess for a BLIP-2 checkpoint with another decoder-only LLM.
        prompts=preset("blip2-opt"),
    )
    post_ln = model.vision_model.post_layernorm
    bridge = Bridge(cfg, model.vision_model, model.language_model)
    state = {f"qformer.{k}": v for k, v in model.qformer.state_dict().items()}
    state["qformer.query_tokens"] = model.query_tokens.detach()
    state.update({f"ln_vision.{k}": v for k, v in post_ln.state_dict().items()})
    state.update({f"language_projection.{k}": v for k, v in model.language_projection.state_dict().items()})
    from qformer.bundle import load_trainable

    load_trainable(bridge, state)
    return bridge


def convert(src: str, out: str | os.PathLike) -> Path:
    """Import a `Blip2ForConditionalGeneration` checkpoint (hub id or directory) as a bundle."""
    if Path(src).exists():
        refuse_pickles(src)
    model = Blip2ForConditionalGeneration.from_pretrained(src, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(src)
    image_processor = AutoImageProcessor.from_pretrained(src)
    return save_bundle(from_hf_blip2(model), tokenizer, image_processor, out)


def to_hf_blip2(bundle: Bundle) -> tuple[Blip2ForConditionalGeneration, object]:
    """A transformers BLIP-2 model (and tokenizer) computing what the bundle computes without a quality prompt.

    Location-token rows are merged into the LLM's embedding and output matrices; an `<image>` placeholder
    token is added when the bundle has none.
    """
    bridge, tokenizer = bundle.bridge, bundle.tokenizer
    if type(bridge.vision).__name__ != "Blip2VisionModel":
        raise BundleError(
            f"export-hf needs BLIP-2's vision tower (Blip2VisionModel); this bundle uses "
            f"{type(bridge.vision).__name__}, which transformers' Blip2ForConditionalGeneration cannot hold "
            "(the demo bundle's tower is a ResNet: serve it with qbridge instead)"
        )

    llm = bridge.llm
    text_cfg = llm.config.get_text_config()
    emb = llm.get_input_embeddings().weight.detach()
    head = llm.get_output_embeddings().weight.detach()
    image_token_index = bridge.cfg.image_token_index
    if image_token_index is None:
        tokenizer = _copy_tokenizer(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
        image_token_index = tokenizer.convert_tokens_to_ids("<image>")
        if image_token_index != emb.shape[0]:
            raise BundleError("the tokenizer and the LLM vocabulary disagree; cannot add an <image> token")
        emb = torch.cat([emb, emb.mean(0, keepdim=True)])
        head = torch.cat([head, torch.zeros_like(head[:1])])

    vision_cfg = bridge.vision.config
    config = Blip2Config(
        vision_config=vision_cfg.to_dict(),
        qformer_config=qformer_config_to_hf(bridge.cfg.qformer).to_dict(),
        text_config=text_cfg.to_dict(),
        num_query_tokens=bridge.cfg.qformer.num_query_tokens,
        image_token_index=image_token_index,
    )
    config.text_config.vocab_size = emb.shape[0]
    config.qformer_config.encoder_hidden_size = vision_cfg.hidden_size
    hf = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        hf.query_tokens.copy_(bridge.qformer.query_tokens)
        # Stage-1 extras (text branch, ITC/ITM/LM heads) have no place in Blip2ForConditionalGeneration.
        ours = bridge.qformer.state_dict()
        hf.qformer.load_state_dict({k: ours[k] for k in hf.qformer.state_dict()}, strict=True)
        vision_sd = {k: v for k, v in bridge.vision.state_dict().items() if not k.startswith("post_layernorm")}
        vision_sd.update({f"post_layernorm.{k}": v for k, v in bridge.ln_vision.state_dict().items()})
        hf.vision_model.load_state_dict(vision_sd, strict=True)
        hf.language_projection.load_state_dict(bridge.language_projection.state_dict())
        llm_sd = {k: v for k, v in llm.state_dict().items() if not _is_vocab_matrix(k, llm)}
        missing, unexpected = hf.language_model.load_state_dict(llm_sd, strict=False)
        hf.language_model.get_input_embeddings().weight.copy_(emb)
        hf.language_model.get_output_embeddings().weight.copy_(head)
        leftover = [k for k in missing if not _is_vocab_matrix(k, hf.language_model)]
        if leftover or unexpected:
            raise BundleError(f"LLM weights do not map onto the export: missing {leftover}, unexpected {unexpected}")
    hf.config.text_config.eos_token_id = tokenizer.eos_token_id
    return hf, tokenizer


def _is_vocab_matrix(key: str, llm: nn.Module) -> bool:
    names = {n for n, m in llm.named_modules() if m is llm.get_input_embeddings() or m is llm.get_output_embeddings()}
    return any(key.startswith(n + ".") for n in names)


def _copy_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def export_hf(bundle_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    bundle = load_bundle(bundle_path)
    hf, tokenizer = to_hf_blip2(bundle)
    out = Path(out)
    hf.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    bundle.image_processor.save_pretrained(out)
    return out


def convert_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qbridge convert",
        description="Import a transformers Blip2ForConditionalGeneration checkpoint (hub id or local directory, "
        "safetensors only) as a qbridge bundle.",
    )
    p.add_argument("--from-hf-blip2", required=True, metavar="SRC", help="hub id or directory of the checkpoint")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    args = p.parse_args(argv)
    out = convert(args.from_hf_blip2, args.out)
    print(f"wrote bundle {out}")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qbridge export-hf",
        description="Write a bundle whose vision tower is BLIP-2's as a transformers Blip2ForConditionalGeneration "
        "checkpoint (quality prompts are not part of that format and are left out).",
    )
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--out", required=True, metavar="DIR")
    args = p.parse_args(argv)
    try:
        out = export_hf(args.bundle, args.out)
    except BundleError as exc:
        print(f"qbridge export-hf: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


__all__ = ["convert", "export_hf", "from_hf_blip2", "to_hf_blip2", "strip_blip2_post_layernorm"]
