"""What the Q-Former's own heads answer, with no LLM: zero-shot classification, image-text matching and
embeddings in the shared ITC space.

They run through ``Bridge.aligner``: stage 1's Q-Former when the bundle carries a frozen copy of it
(``BridgeConfig.alignment_qformer``), else the bridge's own Q-Former, which must then keep its text branch.
Inputs are frozen vision features (``Bridge.encode_images``), so a cached image costs no vision pass.

- :func:`classify`: labels written into prompt templates, scored by ITC similarity (max over queries, as in
  training) and softmaxed at the learned temperature. Over several templates, ``ensemble="mean"`` is CLIP's
  prompt ensembling (each label's text features averaged over the templates and renormalised) and
  ``"max"`` scores each label by its best template.
- :func:`match`: for each (image, text) pair the ITM probability (a BIDIRECTIONAL pass) and the ITC similarity.
- :func:`text_embeddings` / :func:`image_embeddings`: L2-normalised vectors of one dimension (``embed_dim``);
  an image's vector is the normalised mean of its query features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qformer.qformer import AttentionMode

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# How a label's score combines its templates: CLIP's averaged text features, or the best template's similarity.
ENSEMBLES = ("mean", "max")
# Longer texts are cut: the Q-Former's position table is this long in every demo config.
MAX_TEXT_TOKENS = 64


class NoTextBranch(ValueError):
    """The bundle's Q-Former has no text branch (and no stage-1 copy): ITC/ITM cannot be computed."""


def _aligner(bridge):
    aligner = bridge.aligner
    if not aligner.qformer.cfg.with_text:
        raise NoTextBranch("this bundle's Q-Former has no text branch (ITC/ITM heads); alignment needs a bundle "
                           "trained with one (stage 1's, or stage 2 with model.keep_alignment)")
    return aligner


def _tokenize(qformer_tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    if qformer_tokenizer is None:
        raise NoTextBranch("this bundle has no qformer_tokenizer, so texts cannot reach the Q-Former's text branch")
    enc = qformer_tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                            return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


@torch.no_grad()
def text_embeddings(bridge, qformer_tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(T, E) L2-normalised text features ([CLS] of a TEXT pass, projected)."""
    aligner = _aligner(bridge)
    ids, mask = _tokenize(qformer_tokenizer, texts, aligner.qformer.query_tokens.device)
    out = aligner.qformer(AttentionMode.TEXT, input_ids=ids, attention_mask=mask)
    return aligner.qformer.text_features(out.text_output).float()


@torch.no_grad()
def query_features(bridge, vision_feats: torch.Tensor) -> torch.Tensor:
    """(B, N, Dv) frozen features -> (B, Q, E) L2-normalised query features in the ITC space."""
    aligner = _aligner(bridge)
    return aligner.qformer.image_features(aligner.query_output(vision_feats)).float()


@torch.no_grad()
def image_embeddings(bridge, vision_feats: torch.Tensor) -> torch.Tensor:
    """(B, E): the normalised mean of each image's query features."""
    return F.normalize(query_features(bridge, vision_feats).mean(dim=1), dim=-1)


def temperature(bridge) -> float:
    return float(_aligner(bridge).qformer.temp.clamp(min=1e-3, max=0.5))


@torch.no_grad()
def classify(bridge, qformer_tokenizer, vision_feats: torch.Tensor, labels: Sequence[str],
             templates: Sequence[str] = DEFAULT_TEMPLATES, ensemble: str = "mean") -> torch.Tensor:
    """(B, L) probabilities over ``labels`` for each image: softmax(ITC similarity / temperature), the label
    written into each of ``templates`` (each with one ``{}``). ``ensemble="mean"``: the label's text feature is
    the renormalised mean over the templates (CLIP). ``"max"``: the label's similarity is its best template's,
    for templates that vary what the labels do not name ("a red {}", "a blue {}", ...): averaging the features
    of such texts lands between them, near none. On the demo's single-object scenes, shape over the eight
    colour templates: 0.55 top-1 by mean, 0.98 by max (``training.demo.alignment_eval``)."""
    if not labels:
        raise ValueError("give at least one label")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble is one of {ENSEMBLES}, not {ensemble!r}")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"a template holds one {{}} for the label, not {t!r}")
    texts = [t.format(label) for label in labels for t in templates]
    feats = text_embeddings(bridge, qformer_tokenizer, texts).view(len(labels), len(templates), -1)
    image = query_features(bridge, vision_feats)
    if ensemble == "mean":
        label_feats = F.normalize(feats.mean(dim=1), dim=-1)  # (L, E)
        sim = torch.einsum("bqe,le->blq", image, label_feats).amax(dim=-1)
    else:
        sim = torch.einsum("bqe,lte->bltq", image, feats).amax(dim=-1).amax(dim=-1)
    return (sim / temperature(bridge)).softmax(dim=-1)


@torch.no_grad()
def match(bridge, qformer_tokenizer, vision_feats: torch.Tensor, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every image against every text: ``itm`` (B, T) the ITM probability that the text describes the image,
    ``itc`` (B, T) the ITC cosine similarity (max over queries)."""
    if not texts:
        raise ValueError("give at least one text")
    aligner = _aligner(bridge)
    qf = aligner.qformer
    image = aligner.ln_vision(vision_feats.to(aligner.ln_vision.weight.dtype))
    ids, mask = _tokenize(qformer_tokenizer, texts, image.device)
    B, T = image.shape[0], ids.shape[0]
    joint = qf(AttentionMode.BIDIRECTIONAL, image_embeds=image.repeat_interleave(T, dim=0),
               input_ids=ids.repeat(B, 1), attention_mask=mask.repeat(B, 1))
    itm = qf.itm_logits(joint.query_output).float().softmax(dim=-1)[:, 1].view(B, T)
    itc = torch.einsum("bqe,te->btq", query_features(bridge, vision_feats),
                       text_embeddings(bridge, qformer_tokenizer, texts)).amax(dim=-1)
    return {"itm": itm, "itc": itc}
