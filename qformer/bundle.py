"""Bundles: the directory a user loads.

    BUNDLE/
      qbridge.json          {"format_version", "config": BridgeConfig, ...}
      model.safetensors     trainable parts only (Q-Former, ln_vision, projection, quality prompts, loc rows)
      tokenizer/            the LLM tokenizer, location tokens included
      qformer_tokenizer/    the Q-Former's text tokenizer (bundles with the stage-1 text branch only)
      image_processor/      the vision encoder's preprocessing
      vision/, llm/         frozen components when embedded (transformers format, safetensors)
      tasks/NAME.safetensors  optional task prompts (soft prompt vectors, `qbridge train prompt`; qformer.tasks)

Frozen components may instead be referenced by hub id or path, with a sha256 of their weights checked on
load. Loading is strict (exact keys and shapes), safetensors only: pickle files are refused, never opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer

from qformer.bridge import Bridge, load_llm, load_vision_encoder
from qformer.config import BridgeConfig, ComponentRef
from qformer.tasks import TaskPrompt, load_tasks

FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class BundleError(ValueError):
    """A bundle that cannot be loaded as it is; the message says what to fix."""


@dataclass
class Bundle:
    bridge: Bridge
    tokenizer: object
    image_processor: object
    path: Path
    qformer_tokenizer: object | None = None
    tasks: dict[str, TaskPrompt] = field(default_factory=dict)  # task prompts by name (qformer.tasks)

    @property
    def config(self) -> BridgeConfig:
        return self.bridge.cfg


def weights_sha256(directory: str | os.PathLike) -> str:
    """Content hash of a component: the names and bytes of its *.safetensors files."""
    h = hashlib.sha256()
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise BundleError(f"no *.safetensors weights in {directory}")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def refuse_pickles(directory: str | os.PathLike) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith(PICKLE_SUFFIXES):
                raise BundleError(
                    f"{os.path.join(root, name)} is a pickle checkpoint; qbridge loads safetensors only and never "
                    "unpickles. Convert it to safetensors with a tool you trust, then remove the pickle file."
                )


def _resolve(bundle_dir: Path, ref: ComponentRef) -> str:
    if ref.source == "embedded":
        return str(bundle_dir / ref.path)
    if ref.source != "reference":
        raise BundleError(f"component source must be 'embedded' or 'reference', not {ref.source!r}")
    local = Path(ref.path)
    if not local.exists():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(ref.path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    refuse_pickles(local)
    if ref.sha256 and weights_sha256(local) != ref.sha256:
        raise BundleError(f"weights of {ref.path} do not match the sha256 recorded in the bundle")
    return str(local)


def _save_tokenizer(tokenizer, path: Path) -> None:
    """``save_pretrained``, less the padding and truncation a fast tokenizer keeps from its last call (they are
    set again on every call; saved, they would make a bundle depend on what its tokenizer last did)."""
    tokenizer.save_pretrained(path)
    file = path / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(file))
        if backend.padding is not None or backend.truncation is not None:
            backend.no_padding()
            backend.no_truncation()
            backend.save(str(file), pretty=True)  # as save_pretrained writes it


def save_bundle(
    bridge: Bridge,
    tokenizer,
    image_processor,
    out_dir: str | os.PathLike,
    vision_ref: ComponentRef | None = None,
    llm_ref: ComponentRef | None = None,
    qformer_tokenizer=None,
) -> Path:
    """Write a bundle atomically (a temporary directory renamed into place).

    Components are embedded unless a `reference` ComponentRef is given for them.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        vision_ref = vision_ref or ComponentRef("embedded", "vision")
        llm_ref = llm_ref or ComponentRef("embedded", "llm")
        if vision_ref.source == "embedded":
            _save_vision(bridge, tmp / vision_ref.path)
        if llm_ref.source == "embedded":
            _save_llm(bridge, tmp / llm_ref.path)
        cfg = bridge.cfg.replace(vision=vision_ref, llm=llm_ref)
        # The frozen stage-1 copy (ITC/ITM only) is stored in fp16: half its bytes; it computes in fp32 once loaded.
        state = {k: (v.half() if k.startswith("alignment.") and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in bridge.trainable_state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "qbridge_format": str(FORMAT_VERSION)})
        _save_tokenizer(tokenizer, tmp / "tokenizer")
        image_processor.save_pretrained(tmp / "image_processor")
        if qformer_tokenizer is not None:
            _save_tokenizer(qformer_tokenizer, tmp / "qformer_tokenizer")
        meta = {"format_version": FORMAT_VERSION, "config": cfg.to_dict()}
        (tmp / "qbridge.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_vision(bridge: Bridge, path: Path) -> None:
    vision = bridge.vision
    # BLIP-2's post_layernorm lives in ln_vision while loaded; write it back so the tower is complete.
    stripped = type(vision).__name__ == "Blip2VisionModel" and isinstance(vision.post_layernorm, nn.Identity)
    if stripped:
        vision.post_layernorm = _layernorm_copy(bridge.ln_vision)
    try:
        vision.save_pretrained(path, safe_serialization=True)
    finally:
        if stripped:
            vision.post_layernorm = nn.Identity()


def _layernorm_copy(ln: nn.LayerNorm) -> nn.LayerNorm:
    out = nn.LayerNorm(ln.normalized_shape, eps=ln.eps)
    out.load_state_dict(ln.state_dict())
    return out


def _save_llm(bridge: Bridge, path: Path) -> None:
    """The frozen LLM as it was before location tokens were added (their rows are in model.safetensors)."""
    llm = bridge.llm
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    extended = bridge.loc_embeddings is not None
    cfg = llm.config.get_text_config()
    if extended:
        llm.set_input_embeddings(emb.base)
        llm.set_output_embeddings(head.base)
        cfg.vocab_size = bridge.cfg.base_vocab_size
    try:
        llm.save_pretrained(path, safe_serialization=True)
    finally:
        if extended:
            llm.set_input_embeddings(emb)
            llm.set_output_embeddings(head)
            cfg.vocab_size = bridge.cfg.base_vocab_size + bridge.cfg.num_loc_bins


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Bundle:
    """Load strictly: exact keys and shapes in model.safetensors, no pickle anywhere in the bundle."""
    bundle_dir = Path(path)
    meta_file = bundle_dir / "qbridge.json"
    if not meta_file.is_file():
        raise BundleError(f"{bundle_dir} is not a qbridge bundle (no qbridge.json)")
    refuse_pickles(bundle_dir)
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    cfg = BridgeConfig.from_dict(meta["config"])
    weights = bundle_dir / "model.safetensors"
    if not weights.is_file():
        raise BundleError(f"{bundle_dir} has no model.safetensors")

    kwargs = {"dtype": dtype} if dtype is not None else {}
    vision = load_vision_encoder(_resolve(bundle_dir, cfg.vision), **kwargs)
    llm = load_llm(_resolve(bundle_dir, cfg.llm), cfg.llm_quantization, **kwargs)
    bridge = Bridge(cfg, vision, llm)
    load_trainable(bridge, load_file(weights))
    tokenizer = AutoTokenizer.from_pretrained(bundle_dir / "tokenizer")
    image_processor = AutoImageProcessor.from_pretrained(bundle_dir / "image_processor")
    qformer_tokenizer = None
    if (bundle_dir / "qformer_tokenizer").is_dir():
        qformer_tokenizer = AutoTokenizer.from_pretrained(bundle_dir / "qformer_tokenizer")
    try:
        tasks = load_tasks(bundle_dir, llm.config.get_text_config().hidden_size)
    except ValueError as e:
        raise BundleError(str(e)) from None
    if cfg.llm_quantization is None:
        bridge.to(device)
    return Bundle(bridge.eval(), tokenizer, image_processor, bundle_dir, qformer_tokenizer, tasks)


def load_trainable(bridge: Bridge, state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = (),
                   source: str = "model.safetensors") -> None:
    """Strict: the same key set with the same shapes, or a BundleError naming every difference.

    With ``prefixes``, only the trainable keys under them are expected (and all of ``state`` must be under
    them): a stage-1 run's ``ln_vision`` and ``qformer`` inside a stage-2 bridge. The one loader of
    trainable state, for bundles, training checkpoints, stage-1 runs and quality scoring alike.
    """
    expected = {k: v for k, v in bridge.trainable_state_dict().items() if not prefixes or k.startswith(prefixes)}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(state[k].shape)} != expected {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:10]}{' ...' if len(extra) > 10 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:10]}")
        raise BundleError(f"{source} does not match the model's config: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in bridge.state_dict(keep_vars=True).items():
            if k in state:
                v.copy_(state[k])
