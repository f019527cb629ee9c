"""Box codec: boxes <-> location-token sequences (Pix2Seq style, Florence-2 token names).

This module owns everything about how a box is written as text for the LLM and read back:
quantisation, token names, the sequence format, the tolerant parser and per-box scores.
It depends only on the standard library.

Quantisation (Florence-2's pair: Xiao et al., CVPR 2024, section 3)
-------------------------------------------------------------------
Each axis is normalised by its own image size (x by the width, y by the height), so non-square
images use the full bin range on both axes. With ``B = num_bins``::

    bin   = clamp(floor(x / width * B), 0, B - 1)
    x_hat = (bin + 0.5) / B * width                      # the centre of the bin

The decoder is the exact inverse of the encoder (never mix Pix2Seq's ``round(v*(B-1))`` with
a bin-centre decode). For a coordinate inside the image, ``|x_hat - x| <= width / B / 2`` (half a
bin); a coordinate exactly on the right/bottom edge lands in the last bin, still within half a
bin. Coordinates outside the image are clamped into it first.

Boxes thinner than a bin: if both corners of a box fall into the same bin on one axis, the
encoder moves the far corner one bin on (``bin2 = bin1 + 1``, or ``bin1 = bin2 - 1`` at the last
bin), so that every box it writes survives :meth:`BoxCodec.decode` (which drops ``x2 <= x1``).
Only those sub-bin boxes can be off by more than half a bin (at most one and a half bins on the
moved corner). With 1000 bins a bin is 0.1 % of the image side.

Sequence format (fixed; asserted in the tests)
----------------------------------------------
Label text *before* its box, coordinates ``x1 y1 x2 y2``, objects separated by ``"; "``::

    red circle<loc_12><loc_40><loc_30><loc_61>; blue square<loc_1><loc_2><loc_3><loc_4>

Labels are plain text: no ``;``, ``<`` or ``>``; runs of whitespace are folded into one space.
Object order is the caller's order. Training writes objects in one canonical reading order
(:func:`reading_order_key`: the 3x3 cell of the box centre, row by row, then top-left corner), the
order in which captions and the demo LLM's scene descriptions list them, so that a frozen LLM can copy
each box from its context position by position instead of searching for it (Pix2Seq's random order needs
a decoder that learns; ours is frozen).

Parsing (tolerant)
------------------
The text is cut into groups at each ``;`` and also wherever non-whitespace text follows a
location token (a missing separator still separates). A group is kept only if it is
``label`` + exactly four location tokens, with a non-empty label free of ``<``/``>``, every index in
``[0, B)`` and ``x2 > x1``, ``y2 > y1`` after dequantising; any other group (junk text, a
truncated final group, 3 or 5 location tokens, a box before its label) is dropped and its
neighbours are unaffected. Boxes are clipped to the image. Whitespace around labels and tokens
is ignored. The parser never raises on any text.

Scores (Pix2Seq: likelihood of the label)
-----------------------------------------
:meth:`BoxCodec.decode_tokens` scores each box with the joint probability of its label text,
``exp(sum of the log-probs of the generated tokens that make up the label)``. A token is part of
the label when its characters overlap the label's (whitespace-stripped) character span in the
joined text; pure separator or whitespace tokens (``";"``, ``" "``, ``"; "``) do not overlap it and
are not counted, a token such as ``"; red"`` that carries label characters is. The location
tokens are not counted (the score ranks *what* was found, as Pix2Seq's class-token probability
does). Being a joint probability, a longer label tends to score lower than a shorter one
of equal per-token confidence; scores rank boxes of one model on one task, as COCO AP needs.

Pixels of the original image
----------------------------
:class:`Detection` carries ``box_norm`` (in ``[0, 1]``); ``box_norm`` times the original
image's width/height (:meth:`Detection.to_pixels`, :meth:`Detection.rescaled`) maps a box found on a
resized model input back to the original image.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

__all__ = [
    "LOC_TOKEN_RE",
    "SEPARATOR",
    "Box",
    "BoxCodec",
    "Detection",
]

#: Matches one location token and captures its index digits. Indices that are out of range or
#: not written canonically (``<loc_007>``) are recognised as location tokens but are invalid.
LOC_TOKEN_RE = re.compile(r"<loc_(\d+)>")

#: What :meth:`BoxCodec.encode` writes between objects; the parser splits on ``;`` alone.
SEPARATOR = "; "
# The generation budget of one object in a detection sequence: its label (up to 6 tokens), 4 location
# tokens and the separator. Evaluation and the service size ``max_new_tokens`` by it.
DETECT_TOKENS_PER_OBJECT = 11

Box = tuple[float, float, float, float]

_SCAN_RE = re.compile(r"(?P<loc><loc_(?P<idx>\d+)>)|(?P<sep>;)")
_MAX_INDEX_DIGITS = 9  # int() of a huge digit string is slow / refused; no codec has 10**9 bins
_FORBIDDEN_LABEL_CHARS = frozenset(";<>")


@dataclass(frozen=True)
class Detection:
    """One object: ``label``, ``box`` as ``(x1, y1, x2, y2)`` pixels (floats), optional ``score``.

    As input to :meth:`BoxCodec.encode` only ``label`` and ``box`` are read. As output of
    :meth:`BoxCodec.decode` / :meth:`BoxCodec.decode_tokens`, ``box`` is in the pixels of the
    ``width``/``height`` given to the decoder and ``box_norm`` is the same box divided by them
    (in ``[0, 1]``); ``score`` is ``None`` from ``decode`` and a probability from ``decode_tokens``.
    """

    label: str
    box: Box
    score: float | None = None
    box_norm: Box | None = field(default=None, compare=True)

    def to_pixels(self, width: float, height: float) -> Box:
        """``box_norm`` scaled to an image of ``width`` x ``height`` (e.g. the original image)."""
        if self.box_norm is None:
            raise ValueError("to_pixels needs box_norm (set by BoxCodec.decode)")
        w, h = _check_size(width, height)
        x1, y1, x2, y2 = self.box_norm
        return (x1 * w, y1 * h, x2 * w, y2 * h)

    def rescaled(self, width: float, height: float) -> "Detection":
        """A copy whose ``box`` is in the pixels of a ``width`` x ``height`` image."""
        return Detection(self.label, self.to_pixels(width, height), self.score, self.box_norm)


ObjectLike = Union[Detection, tuple[str, Sequence[float]]]


@dataclass
class _Group:
    """A parsed candidate group: label character span in the text and its location indices."""

    label_start: int = -1
    label_end: int = -1
    label: str = ""
    bins: list[int] = field(default_factory=list)
    bad: bool = False

    @property
    def has_loc(self) -> bool:
        return bool(self.bins) or self.bad


@dataclass(frozen=True)
class BoxCodec:
    """Quantise boxes into ``num_bins`` location tokens per axis and write/read sequences.

    See the module docstring for the exact quantisation, format, parsing and scoring rules.
    """

    num_bins: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or self.num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {self.num_bins!r}")

    # ---------------------------------------------------------------- tokens
    def token(self, index: int) -> str:
        """The token for bin ``index``: ``<loc_{index}>``."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_bins:
            raise ValueError(f"location index must be an int in [0, {self.num_bins}), got {index!r}")
        return f"<loc_{index}>"

    def tokens(self) -> list[str]:
        """All location tokens in bin order: ``["<loc_0>", ..., "<loc_{B-1}>"]``."""
        return [f"<loc_{i}>" for i in range(self.num_bins)]

    def parse_token(self, piece: str) -> int | None:
        """The bin of ``piece`` if it is exactly one valid location token of this codec, else None."""
        m = LOC_TOKEN_RE.fullmatch(piece.strip()) if isinstance(piece, str) else None
        return self._index(m.group(1)) if m else None

    def _index(self, digits: str) -> int | None:
        if len(digits) > _MAX_INDEX_DIGITS or (len(digits) > 1 and digits[0] == "0"):
            return None
        i = int(digits)
        return i if i < self.num_bins else None

    # ---------------------------------------------------------- quantisation
    def quantize(self, value: float, size: float) -> int:
        """Bin of one coordinate: ``clamp(floor(value / size * B), 0, B - 1)``."""
        size, _ = _check_size(size, size)
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"coordinate must be finite, got {value!r}")
        b = math.floor(v * self.num_bins / size)
        return min(max(b, 0), self.num_bins - 1)

    def dequantize(self, index: int, size: float) -> float:
        """Centre of bin ``index`` in pixels: ``(index + 0.5) / B * size``."""
        return (index + 0.5) / self.num_bins * size

    def encode_box(self, box: Sequence[float], width: float, height: float) -> tuple[int, int, int, int]:
        """Bins ``(x1, y1, x2, y2)`` of a pixel box; sub-bin extents are widened to one bin.

        Raises ValueError for a non-finite box, ``x2 < x1`` / ``y2 < y1``, or a box that does not
        touch the image.
        """
        w, h = _check_size(width, height)
        x1, y1, x2, y2 = _check_box(box)
        if x1 > w or y1 > h or x2 < 0 or y2 < 0:
            raise ValueError(f"box {tuple(box)!r} lies outside the {w}x{h} image")
        bx1, bx2 = self._axis(x1, x2, w)
        by1, by2 = self._axis(y1, y2, h)
        return (bx1, by1, bx2, by2)

    def _axis(self, lo: float, hi: float, size: float) -> tuple[int, int]:
        q1, q2 = self.quantize(lo, size), self.quantize(hi, size)
        if q2 <= q1:  # both corners in one bin: keep the box representable
            if q1 < self.num_bins - 1:
                q2 = q1 + 1
            else:
                q1 = q2 - 1
        return q1, q2

    def decode_box(self, bins: Sequence[int], width: float, height: float) -> Box:
        """Pixel box (bin centres) of four bins ``(x1, y1, x2, y2)``."""
        w, h = _check_size(width, height)
        bx1, by1, bx2, by2 = bins
        return (self.dequantize(bx1, w), self.dequantize(by1, h),
                self.dequantize(bx2, w), self.dequantize(by2, h))

    # -------------------------------------------------------------- sequences
    def encode(self, objects: Iterable[ObjectLike], width: float, height: float) -> str:
        """The target sequence for ``objects`` (``Detection`` or ``(label, (x1, y1, x2, y2))``).

        Order is preserved. Raises ValueError on an empty label, a label containing ``;``, ``<``
        or ``>``, or an invalid box (see :meth:`encode_box`).
        """
        parts = []
        for obj in objects:
            if isinstance(obj, Detection):
                label, box = obj.label, obj.box
            else:
                label, box = obj
            label = _clean_label(label)
            bins = self.encode_box(box, width, height)
            parts.append(label + "".join(f"<loc_{b}>" for b in bins))
        return SEPARATOR.join(parts)

    def decode(self, text: str, width: float, height: float) -> list[Detection]:
        """Detections in ``text``; malformed groups are dropped (see the module docstring)."""
        w, h = _check_size(width, height)
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return [self._detection(g, w, h, None) for g in self._parse(text)]

    def decode_tokens(self, tokens: Sequence[str], logprobs: Sequence[float],
                      width: float, height: float) -> list[Detection]:
        """Like ``decode("".join(tokens), ...)`` with each box scored by its label's probability.

        ``tokens`` are the generated tokens decoded one by one (their concatenation is the text);
        ``logprobs`` their log-probabilities. ``score = exp(sum of logprobs of the tokens whose
        characters overlap the label)``; separator/whitespace-only tokens and location tokens do
        not count.
        """
        w, h = _check_size(width, height)
        tokens = list(tokens)
        lps = [float(x) for x in logprobs]
        if len(tokens) != len(lps):
            raise ValueError(f"{len(tokens)} tokens but {len(lps)} log-probs")
        starts, ends, pos = [], [], 0
        for t in tokens:
            if not isinstance(t, str):
                raise TypeError(f"tokens must be str pieces, got {type(t).__name__}")
            starts.append(pos)
            pos += len(t)
            ends.append(pos)
        out = []
        for g in self._parse("".join(tokens)):
            # tokens overlapping [label_start, label_end): end > label_start and start < label_end
            total = 0.0
            k = bisect.bisect_right(ends, g.label_start)
            while k < len(tokens) and starts[k] < g.label_end:
                total += lps[k]
                k += 1
            # log-probs are <= 0; clamp so a caller's rounding noise cannot give a score above 1
            out.append(self._detection(g, w, h, math.exp(min(total, 0.0))))
        return out

    # ---------------------------------------------------------------- parsing
    def _parse(self, text: str) -> list[_Group]:
        """Valid groups of ``text`` in order (never raises)."""
        groups: list[_Group] = []
        cur = _Group()

        def close() -> None:
            nonlocal cur
            if self._valid(cur):
                groups.append(cur)
            cur = _Group()

        def add_text(s: int, e: int) -> None:
            nonlocal cur
            chunk = text[s:e]
            stripped = chunk.strip()
            if not stripped:
                return
            if cur.has_loc or cur.label_start >= 0:
                # text after a location token starts a new group; a second label chunk cannot occur
                close()
            lead = len(chunk) - len(chunk.lstrip())
            cur.label_start = s + lead
            cur.label_end = cur.label_start + len(stripped)
            cur.label = stripped

        pos = 0
        for m in _SCAN_RE.finditer(text):
            add_text(pos, m.start())
            pos = m.end()
            if m.group("sep") is not None:
                close()
            else:
                idx = self._index(m.group("idx"))
                if idx is None:
                    cur.bad = True
                else:
                    cur.bins.append(idx)
        add_text(pos, len(text))
        close()
        return groups

    def _valid(self, g: _Group) -> bool:
        if g.bad or len(g.bins) != 4 or g.label_start < 0:
            return False
        if any(c in _FORBIDDEN_LABEL_CHARS for c in g.label):
            return False
        bx1, by1, bx2, by2 = g.bins
        # bin centres are monotone in the bin index, so x2 > x1 after dequantising <=> bx2 > bx1
        return bx2 > bx1 and by2 > by1

    def _detection(self, g: _Group, w: float, h: float, score: float | None) -> Detection:
        b = self.num_bins
        norm = tuple(min(max((i + 0.5) / b, 0.0), 1.0) for i in g.bins)
        x1, y1, x2, y2 = norm
        px = (min(max(x1 * w, 0.0), w), min(max(y1 * h, 0.0), h),
              min(max(x2 * w, 0.0), w), min(max(y2 * h, 0.0), h))
        return Detection(" ".join(g.label.split()), px, score, norm)  # type: ignore[arg-type]


def reading_order_key(box: Sequence[float], width: float, height: float) -> tuple:
    """Sort key of a box in reading order: the row and column of the 3x3 cell holding its centre, then
    its top edge and its left edge. One definition for captions, scene descriptions and detection targets."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(int(3 * cy / height), 2), min(int(3 * cx / width), 2), box[1], box[0]


def _check_size(width: float, height: float) -> tuple[float, float]:
    try:
        w, h = float(width), float(height)
    except (TypeError, ValueError):
        raise ValueError(f"image size must be numbers, got {width!r} x {height!r}") from None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"image size must be positive and finite, got {width!r} x {height!r}")
    return w, h


def _check_box(box: Sequence[float]) -> Box:
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be four numbers (x1, y1, x2, y2), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box must be finite, got {box!r}")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box must have x2 >= x1 and y2 >= y1, got {box!r}")
    return (x1, y1, x2, y2)


def _clean_label(label: str) -> str:
    if not isinstance(label, str):
        raise ValueError(f"label must be a string, got {label!r}")
    clean = " ".join(label.split())
    if not clean:
        raise ValueError("label must not be empty")
    bad = _FORBIDDEN_LABEL_CHARS.intersection(clean)
    if bad:
        raise ValueError(f"label {label!r} must not contain {''.join(sorted(bad))!r}")
    return clean
