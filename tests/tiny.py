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
    LlamaConfig,
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


def tiny_blip2(tokenizer, seed: int = 0, num_query_tokens: int = 5) -> Blip2ForConditionalGeneration:
    torch.manual_seed(seed)
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
    )
    qformer = Blip2QFormerConfig(
        hidden_size=36, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, encoder_hidden_size=32
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
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


def save_tiny_blip2(path, seed: int = 0) -> tuple[Blip2ForConditionalGeneration, PreTrainedTokenizerFast]:
    tokenizer = tiny_tokenizer()
    model = tiny_blip2(tokenizer, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    tiny_image_processor().save_pretrained(path)
    return model, tokenizer
