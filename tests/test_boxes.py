"""Box codec: quantisation round trip, the fixed sequence format, the tolerant parser, scores."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qformer.boxes import LOC_TOKEN_RE, SEPARATOR, BoxCodec, Detection

SIZES = [(640, 480), (37, 211), (480, 640), (1, 1), (1920.5, 3.25)]
BINS = [2, 7, 64, 100, 1000, 1024]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _half_bin(size: float, bins: int) -> float:
    # half a bin, plus a hair for float rounding in x * B / size
    return size / bins / 2 * (1 + 1e-9) + 1e-12


def _loc(*bins: int) -> str:
    return "".join(f"<loc_{b}>" for b in bins)


# --------------------------------------------------------------------- codec basics
def test_num_bins_validated():
    assert BoxCodec().num_bins == 1000
    for bad in (0, 1, -5, 2.5, True, "10"):
        with pytest.raises(ValueError):
            BoxCodec(bad)  # type: ignore[arg-type]


def test_tokens_and_token_regex():
    codec = BoxCodec(64)
    toks = codec.tokens()
    assert toks[0] == "<loc_0>" and toks[-1] == "<loc_63>" and len(toks) == len(set(toks)) == 64
    assert all(codec.token(i) == t for i, t in enumerate(toks))
    assert all(codec.parse_token(t) == i for i, t in enumerate(toks))
    assert all(int(LOC_TOKEN_RE.fullmatch(t).group(1)) == i for i, t in enumerate(toks))
    for bad in ("<loc_64>", "<loc_007>", "loc_3", "<loc_3", "<loc_-1>", "red", "<loc_1><loc_2>", ""):
        assert codec.parse_token(bad) is None, bad
    for bad in (-1, 64, 1.0, True):
        with pytest.raises(ValueError):
            codec.token(bad)  # type: ignore[arg-type]


def test_quantise_is_floor_and_dequantise_is_bin_centre():
    codec = BoxCodec(10)
    assert [codec.quantize(x, 100) for x in (0, 9.99, 10, 55, 99.9, 100, 150, -3)] == [0, 0, 1, 5, 9, 9, 9, 0]
    assert codec.dequantize(0, 100) == pytest.approx(5.0)
    assert codec.dequantize(9, 100) == pytest.approx(95.0)
    # x and y are normalised separately: same relative position, same bin on a non-square image
    assert codec.quantize(320, 640) == codec.quantize(240, 480) == 5


# ----------------------------------------------------------------- round trip property
@st.composite
def _size_bins_box(draw):
    w, h = draw(st.sampled_from(SIZES))
    bins = draw(st.sampled_from(BINS))
    xs = sorted(draw(st.lists(st.floats(0, w), min_size=2, max_size=2)))
    ys = sorted(draw(st.lists(st.floats(0, h), min_size=2, max_size=2)))
    return w, h, bins, (xs[0], ys[0], xs[1], ys[1])


@FAST
@given(_size_bins_box())
def test_round_trip_within_half_a_bin(case):
    w, h, bins, box = case
    codec = BoxCodec(bins)
    # a box whose corners share a bin is widened by the encoder (tested separately)
    assume(codec.quantize(box[0], w) < codec.quantize(box[2], w))
    assume(codec.quantize(box[1], h) < codec.quantize(box[3], h))
    (det,) = codec.decode(codec.encode([("thing", box)], w, h), w, h)
    assert det.label == "thing" and det.score is None
    for got, want, size in zip(det.box, box, (w, h, w, h)):
        assert abs(got - want) <= _half_bin(size, bins)
    for n, p, size in zip(det.box_norm, det.box, (w, h, w, h)):
        assert 0.0 <= n <= 1.0 and n * size == pytest.approx(p)


@FAST
@given(st.sampled_from(SIZES), st.sampled_from(BINS), st.floats(0, 1))
def test_coordinate_round_trip_within_half_a_bin(size, bins, frac):
    codec = BoxCodec(bins)
    for s in size:
        x = frac * s
        assert abs(codec.dequantize(codec.quantize(x, s), s) - x) <= _half_bin(s, bins)


@FAST
@given(st.lists(_size_bins_box(), min_size=1, max_size=6))
def test_every_encoded_box_survives_decode_in_order(cases):
    w, h, bins, _ = cases[0]
    codec = BoxCodec(bins)
    objs = [(f"obj {i}", box) for i, (_, _, _, box) in enumerate(cases)
            if box[0] <= w and box[1] <= h]  # boxes drawn for another size may lie outside
    assume(objs)
    dets = codec.decode(codec.encode(objs, w, h), w, h)
    assert [d.label for d in dets] == [label for label, _ in objs]
    for d, (_, box) in zip(dets, objs):
        # sub-bin boxes are widened by one bin: at most 1.5 bins off
        for got, want, size in zip(d.box, box, (w, h, w, h)):
            assert abs(got - min(max(want, 0), size)) <= 3 * _half_bin(size, bins)


def test_sub_bin_box_is_widened_not_lost():
    codec = BoxCodec(1000)
    w, h = 640, 480
    assert codec.encode_box((10.0, 10.0, 10.1, 10.0), w, h) == (15, 20, 16, 21)
    assert codec.encode_box((w, h, w, h), w, h) == (998, 998, 999, 999)  # at the far edge: moved back
    (det,) = codec.decode(codec.encode([("dot", (10.0, 10.0, 10.1, 10.0))], w, h), w, h)
    assert det.box[2] > det.box[0] and det.box[3] > det.box[1]


# --------------------------------------------------------------------- sequence format
def test_exact_sequence_format():
    codec = BoxCodec(1000)
    objs = [("red circle", (12.3, 40.9, 30.0, 61.5)), Detection("blue square", (1, 2, 3, 4.999))]
    assert codec.encode(objs, 1000, 1000) == (
        "red circle<loc_12><loc_40><loc_30><loc_61>; blue square<loc_1><loc_2><loc_3><loc_4>"
    )
    # non-square: x by the width, y by the height
    objs2 = [("red circle", (24.6, 20.45, 60.0, 30.75)), ("blue square", (2, 1, 6, 2.4995))]
    assert codec.encode(objs2, 2000, 500) == (
        "red circle<loc_12><loc_40><loc_30><loc_61>; blue square<loc_1><loc_2><loc_3><loc_4>"
    )
    assert SEPARATOR == "; "
    assert codec.encode([], 10, 10) == ""
    # order preserved, whitespace in labels folded
    assert codec.encode([("  b   c ", (0, 0, 5, 5)), ("a", (5, 5, 10, 10))], 10, 10) == (
        "b c<loc_0><loc_0><loc_500><loc_500>; a<loc_500><loc_500><loc_999><loc_999>"
    )


@pytest.mark.parametrize("label", ["", "   ", "a;b", "a<b", "x>y", None])
def test_encode_rejects_bad_labels(label):
    with pytest.raises(ValueError):
        BoxCodec().encode([(label, (0, 0, 5, 5))], 10, 10)


@pytest.mark.parametrize("box", [(5, 0, 4, 5), (0, 5, 5, 4), (0, 0, math.nan, 5), (0, 0, math.inf, 5),
                                 (20, 0, 30, 5), (0, -9, 5, -1), (1, 2, 3), ("a", 0, 1, 1)])
def test_encode_rejects_bad_boxes(box):
    with pytest.raises(ValueError):
        BoxCodec().encode([("x", box)], 10, 10)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (math.nan, 10), (10, math.inf)])
def test_bad_image_size(size):
    codec = BoxCodec()
    with pytest.raises(ValueError):
        codec.encode([("x", (0, 0, 1, 1))], *size)
    with pytest.raises(ValueError):
        codec.decode("x" + _loc(1, 2, 3, 4), *size)


# ------------------------------------------------------------------------ the parser
def test_decode_known_sequence():
    codec = BoxCodec(1000)
    dets = codec.decode("red circle<loc_12><loc_40><loc_30><loc_61>; blue square<loc_1><loc_2><loc_3><loc_4>",
                        2000, 500)
    assert [d.label for d in dets] == ["red circle", "blue square"]
    assert dets[0].box == pytest.approx((25.0, 20.25, 61.0, 30.75))
    assert dets[0].box_norm == pytest.approx((0.0125, 0.0405, 0.0305, 0.0615))
    assert dets[1].box == pytest.approx((3.0, 1.25, 7.0, 2.25))
    assert all(d.score is None for d in dets)


GOOD_A = "red circle" + _loc(10, 20, 30, 40)
GOOD_B = "blue square" + _loc(50, 60, 70, 80)


@pytest.mark.parametrize("bad", [
    "green" + _loc(1, 2, 3),                      # missing a loc token
    "green" + _loc(1, 2, 3, 4, 5),                # an extra loc token
    _loc(1, 2, 3, 4),                             # missing label
    "   " + _loc(1, 2, 3, 4),                     # whitespace-only label
    "lorem ipsum dolor",                          # junk text
    "",                                           # empty group
    "green" + _loc(1, 2, 3, 100),                 # out-of-range index (100 bins)
    "green" + _loc(1, 2, 100, 3, 4),              # out-of-range index among four valid ones
    "green" + _loc(1, 2, 3) + "<loc_99999999999999999999999>",  # absurd index
    "green<loc_01><loc_2><loc_3><loc_4>",         # non-canonical index
    "green" + _loc(5, 2, 5, 4),                   # x2 == x1
    "green" + _loc(6, 2, 5, 4),                   # x2 < x1
    "green" + _loc(1, 4, 3, 4),                   # y2 == y1
    "green" + _loc(1, 2) + " x " + _loc(3, 4),    # text inside the box
    _loc(1, 2, 3, 4) + " green",                  # label after its box
    "gr<een" + _loc(1, 2, 3, 4),                  # a label with markup
    "green<loc_1><loc_2><loc_x><loc_4>",          # garbled token
])
def test_malformed_group_dropped_neighbours_survive(bad):
    codec = BoxCodec(100)
    for text in (f"{GOOD_A}; {bad}; {GOOD_B}", f"{bad}; {GOOD_A}; {GOOD_B}", f"{GOOD_A}; {GOOD_B}; {bad}"):
        dets = codec.decode(text, 640, 480)
        assert [d.label for d in dets] == ["red circle", "blue square"], text
        assert dets[0].box == pytest.approx((67.2, 98.4, 195.2, 194.4))


@pytest.mark.parametrize("cut", range(1, len(GOOD_B)))
def test_truncated_final_group_dropped(cut):
    codec = BoxCodec(100)
    dets = codec.decode(f"{GOOD_A}; {GOOD_B[:cut]}", 100, 100)
    assert [d.label for d in dets] == ["red circle"]


def test_parser_tolerates_whitespace_and_missing_separators():
    codec = BoxCodec(100)
    texts = [
        f"  {GOOD_A} ;  {GOOD_B}  ",
        f"{GOOD_A};{GOOD_B};",
        f";; {GOOD_A} ; ; {GOOD_B}",
        f"{GOOD_A}{GOOD_B}",                          # separator missing
        f"{GOOD_A} {GOOD_B}\n",
        "red   circle <loc_10> <loc_20>\t<loc_30> <loc_40>; " + GOOD_B,
    ]
    for text in texts:
        dets = codec.decode(text, 100, 100)
        assert [d.label for d in dets] == ["red circle", "blue square"], text
        assert [tuple(round(v, 6) for v in d.box) for d in dets] == [
            (10.5, 20.5, 30.5, 40.5), (50.5, 60.5, 70.5, 80.5)], text
    assert codec.decode("", 10, 10) == []
    assert codec.decode(" ; ;; ", 10, 10) == []


def test_boxes_clipped_to_image():
    codec = BoxCodec(1000)
    w, h = 640, 480
    (det,) = codec.decode(codec.encode([("big", (-50, -10, 700, 900))], w, h), w, h)
    x1, y1, x2, y2 = det.box
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert det.box == pytest.approx((0.32, 0.24, 639.68, 479.76))
    assert all(0.0 <= v <= 1.0 for v in det.box_norm)
    # the same tokens decoded for any image size stay inside that image
    for size in [(1, 1), (37, 211), (10000, 3)]:
        for d in codec.decode("a<loc_0><loc_0><loc_999><loc_999>", *size):
            assert 0 <= d.box[0] < d.box[2] <= size[0] and 0 <= d.box[1] < d.box[3] <= size[1]


def test_detection_maps_to_original_pixels():
    codec = BoxCodec(100)
    text = "red circle" + _loc(10, 20, 30, 40)
    (small,) = codec.decode(text, 224, 224)   # what the model saw
    (orig,) = codec.decode(text, 640, 480)    # the original image
    assert small.to_pixels(640, 480) == pytest.approx(orig.box)
    big = small.rescaled(640, 480)
    assert big.label == small.label and big.box == pytest.approx(orig.box) and big.box_norm == small.box_norm
    with pytest.raises(ValueError):
        Detection("x", (0, 0, 1, 1)).to_pixels(10, 10)


# --------------------------------------------------------------------- scores
def test_decode_tokens_scores_are_label_joint_probabilities():
    codec = BoxCodec(100)
    tokens = ["red", " circle", *_loc(10, 20, 30, 40).replace("><", ">|<").split("|"),
              ";", " blue", " sq", "uare", *_loc(50, 60, 70, 80).replace("><", ">|<").split("|"),
              "; ", "junk", ";",                                  # malformed group between
              "; green", "<loc_1>", "<loc_2>", "<loc_3>", "<loc_4>",  # separator attached to the label
              " ", ";", " tiny", "<loc_5>", "<loc_6>",            # truncated: dropped
              ]
    logprobs = [-0.1 * (i + 1) for i in range(len(tokens))]
    lp = dict(zip(range(len(tokens)), logprobs))
    text = "".join(tokens)
    dets = codec.decode_tokens(tokens, logprobs, 640, 480)
    assert [d.label for d in dets] == ["red circle", "blue square", "green"]
    assert dets[0].score == pytest.approx(math.exp(lp[0] + lp[1]))
    assert dets[1].score == pytest.approx(math.exp(lp[7] + lp[8] + lp[9]))
    i_green = tokens.index("; green")
    assert dets[2].score == pytest.approx(math.exp(lp[i_green]))
    plain = codec.decode(text, 640, 480)
    assert [(d.label, d.box, d.box_norm) for d in dets] == [(d.label, d.box, d.box_norm) for d in plain]


def test_decode_tokens_validates_lengths():
    with pytest.raises(ValueError):
        BoxCodec().decode_tokens(["a", "b"], [0.0], 10, 10)


_FRAGMENTS = ["red", " circle", "blue", " ", ";", "; ", "<loc_", "<loc_3>", "<loc_12>", "<loc_99>",
              "<loc_100>", "<loc_007>", ">", "<", "_", "0", "7", "loc", "\n", "é", "</s>", "x"]


@st.composite
def _tokenised(draw):
    """A text (from loc-ish fragments, real encodings or arbitrary unicode) split into pieces."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        text = "".join(draw(st.lists(st.sampled_from(_FRAGMENTS), max_size=40)))
    elif kind == 1:
        objs = draw(st.lists(st.tuples(st.sampled_from(["red circle", "blue", "a b c"]),
                                       st.tuples(st.integers(0, 49), st.integers(0, 49),
                                                 st.integers(50, 99), st.integers(50, 99))),
                             max_size=5))
        text = BoxCodec(100).encode(objs, 100, 100)
    else:
        text = draw(st.text(max_size=60))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=20)))
    pieces, prev = [], 0
    for c in cuts + [len(text)]:
        pieces.append(text[prev:c])
        prev = c
    logprobs = draw(st.lists(st.floats(-20, 0), min_size=len(pieces), max_size=len(pieces)))
    return pieces, logprobs


@FAST
@given(_tokenised(), st.sampled_from([(640, 480), (37, 211)]))
def test_decode_tokens_equals_decode_of_joined_text(case, size):
    pieces, logprobs = case
    codec = BoxCodec(100)
    scored = codec.decode_tokens(pieces, logprobs, *size)
    plain = codec.decode("".join(pieces), *size)
    assert [(d.label, d.box, d.box_norm) for d in scored] == [(d.label, d.box, d.box_norm) for d in plain]
    assert all(d.score is not None and 0.0 <= d.score <= 1.0 for d in scored)


@FAST
@given(st.one_of(st.text(max_size=200),
                 st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map("".join)),
       st.sampled_from(BINS))
def test_decode_never_raises(text, bins):
    codec = BoxCodec(bins)
    for d in codec.decode(text, 37, 211):
        assert d.label and d.label == d.label.strip() and not set(d.label) & set(";<>")
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= 37 and 0 <= y1 < y2 <= 211
        assert all(0.0 <= v <= 1.0 for v in d.box_norm)
