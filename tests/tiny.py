"""Tiny random models built in code (no downloads), with odd sizes so shape bugs show."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "a red circle and a blue square on a grey background",
    "question: what colour is the circle? answer: red",
    "how many shapes are there? three small green triangles",
    "a photo of a large yellow star next to a purple hexagon",
] * 4


def tiny_tokenizer(extra_special: tuple[str, ...] = ("<image>",)) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def tiny_blip2(tokenizer, seed: int = 0, num_query_tokens: int = 5, llm: str = "llama"):
    """A random Blip2ForConditionalGeneration; `llm` "opt" is the LLM family BLIP-2 was released with."""
    torch.manual_seed(seed)
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
    )
    qformer = Blip2QFormerConfig(
        hidden_size=36, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, encoder_hidden_size=32
    )
    text = tiny_llm_config(llm, tokenizer)
    # A random LLM whose head is its input embedding (OPT ties them) only repeats its last input token.
    text.tie_word_embeddings = False
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    # Random init of this size gives near-uniform logits; sharpen the LM head so greedy choices are not ties.
    with torch.no_grad():
        model.language_model.get_output_embeddings().weight.mul_(30.0)
        model.query_tokens.normal_(0, 1.0)
    return model


def tiny_image_processor() -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": 30, "width": 30})


def scene(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = (int(v) for v in torch.randint(0, min(size) - 8, (2,), generator=g))
        d.ellipse([x, y, x + 8, y + 8], fill=tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g)))
    return img


def save_tiny_blip2(path, seed: int = 0, llm: str = "llama"):
    """(model, tokenizer), saved to `path` as a transformers checkpoint with its image processor."""
    tokenizer = tiny_tokenizer()
    model = tiny_blip2(tokenizer, seed, llm=llm)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    tiny_image_processor().save_pretrained(path)
    return model, tokenizer


def tiny_vision(kind: str = "blip2", seed: int = 0):
    """A tiny vision tower of the given family and an image processor for it."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    if kind == "blip2":
        model = T.Blip2VisionModel(T.Blip2VisionConfig(**common, image_size=30, patch_size=6))
    elif kind == "clip":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**common, image_size=30, patch_size=6))
    elif kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**common, image_size=30, patch_size=6))
    elif kind == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(**common, image_size=30, patch_size=6))
    elif kind == "resnet":  # a conv tower: (B, 32, 4, 4) maps, read as 16 tokens with a 2-D position embedding
        model = T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[12, 32], depths=[1, 1],
                                             layer_type="basic", downsample_in_first_stage=False))
    else:
        raise ValueError(kind)
    return model.eval(), tiny_image_processor()


def tiny_llm_config(kind: str, tokenizer):
    import transformers as T

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "llama":
        return T.LlamaConfig(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **ids)
    if kind == "qwen2":
        return T.Qwen2Config(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **ids)
    if kind == "opt":
        return T.OPTConfig(hidden_size=48, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=48, max_position_embeddings=128, **ids)
    raise ValueError(kind)


def tiny_llm(kind: str, tokenizer, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    model_class = {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM, "opt": T.OPTForCausalLM}[kind]
    model = model_class(tiny_llm_config(kind, tokenizer))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model.eval()


def tiny_bridge(vision_kind="blip2", llm_kind="llama", num_loc_bins=0, num_quality_levels=0, seed=0, with_text=True):
    """(bridge, tokenizer, image_processor) from tiny random components."""
    from qformer.bridge import Bridge
    from qformer.config import BridgeConfig, QFormerConfig

    tokenizer = tiny_tokenizer()
    base_vocab = len(tokenizer)
    if num_loc_bins:
        tokenizer.add_tokens([f"<loc_{i}>" for i in range(num_loc_bins)])
    vision, processor = tiny_vision(vision_kind, seed)
    llm = tiny_llm(llm_kind, tokenizer if not num_loc_bins else _Sized(base_vocab, tokenizer), seed)
    cfg = BridgeConfig(
        qformer=QFormerConfig(hidden_size=36, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                              encoder_hidden_size=32, num_query_tokens=5, with_text=with_text, vocab_size=len(tokenizer)),
        vision_hidden_size=32,
        llm_hidden_size=48,
        num_quality_levels=num_quality_levels,
        quality_prompt_len=3,
        quality_names=tuple(f"q{i}" for i in range(num_quality_levels)),
        num_loc_bins=num_loc_bins,
        base_vocab_size=base_vocab,
    )
    torch.manual_seed(seed + 1)
    bridge = Bridge(cfg, vision, llm).eval()
    with torch.no_grad():
        bridge.qformer.query_tokens.normal_(0, 1.0)
        if bridge.quality_prompts is not None:
            bridge.quality_prompts.normal_(0, 1.0)
        if num_loc_bins:
            bridge.loc_embeddings.normal_(0, 1.0)
            bridge.loc_head.normal_(0, 3.0)
    return bridge, tokenizer, processor


class _Sized:
    """Tokenizer stand-in reporting the vocabulary before location tokens were added."""

    def __init__(self, n, tokenizer):
        self.n, self.t = n, tokenizer

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        return getattr(self.t, name)


def pixel_processor(images, return_tensors="pt"):
    """An image processor in its plainest form: the RGB pixels as floats, (B, 3, H, W)."""
    import numpy as np

    class Out:
        pixel_values = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() for im in images])
    return Out()
