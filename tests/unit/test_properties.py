"""Property-based tests (Hypothesis) for the pure stages: URL screening, export round-trips,
grounding, and dedup decisions against a brute-force reference."""

from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from denseforge.stages import dedup as dd
from denseforge.stages import export as ex
from denseforge.stages.dialects import Kosmos2
from denseforge.stages.ground import ground_mentions
from denseforge.stages.sample import Grounding, Sample
from denseforge.stages.url_screen import is_public_address, screen_url

ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@given(ipv4)
@settings(max_examples=400, deadline=None)
def test_an_ipv4_target_is_refused_exactly_when_it_is_not_public(ip):
    verdict = screen_url(f"http://{ip}/a.jpg")
    expected_public = ip.is_global and not ip.is_multicast
    assert (verdict is None) == expected_public
    if verdict is not None:
        assert verdict.reason == "private_address"


@given(ipv4)
@settings(max_examples=300, deadline=None)
def test_every_ipv6_form_that_embeds_an_ipv4_gets_the_ipv4_verdict(ip):
    v4 = int(ip)
    forms = [
        ipaddress.IPv6Address((0xFFFF << 32) | v4),  # ::ffff:a.b.c.d
        ipaddress.IPv6Address((0x0064FF9B << 96) | v4),  # 64:ff9b::a.b.c.d
        ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80)),  # 6to4 2002:aabb:ccdd::
        ipaddress.IPv6Address((0xFFFF << 48) | v4),
    ]  # ::ffff:0:a.b.c.d
    if v4 > 1:
        forms.append(ipaddress.IPv6Address(v4))  # ::a.b.c.d (compatible)
    for form in forms:
        assert is_public_address(str(form)) == is_public_address(str(ip)), form


boxes = st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)).filter(
    lambda b: b[0] < b[2] - 0.002 and b[1] < b[3] - 0.002
)
sizes = st.tuples(st.integers(16, 4000), st.integers(16, 4000))


def _sample(rel, size) -> Sample:
    w, h = size
    box = [rel[0] * w, rel[1] * h, rel[2] * w, rel[3] * h]
    caption = "a thing here"
    return Sample(
        key="k",
        width=w,
        height=h,
        sha256="0",
        caption=caption,
        grounding=[Grounding(phrase="thing", span=(2, 7), box=box, source="objects/0")],
    )


@given(boxes, sizes)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_kosmos_round_trip_covers_the_box_within_one_bin(rel, size):
    sample = _sample(rel, size)
    kosmos = Kosmos2()
    plain, [ref] = kosmos.parse(ex.grounded_text(sample, kosmos))
    box = kosmos.decode(ref.boxes[0], *size)
    orig = sample.grounding[0].box
    w, h = size
    bin_w, bin_h = w / 32, h / 32
    assert plain == sample.caption and ref.phrase == "thing"
    assert box[0] <= orig[0] + 1e-6 and box[1] <= orig[1] + 1e-6  # the bins cover the box...
    assert box[2] >= orig[2] - 1e-6 and box[3] >= orig[3] - 1e-6
    assert orig[0] - box[0] < bin_w + 1e-6 and box[2] - orig[2] < bin_w + 1e-6  # ...and not by more than a bin
    assert orig[1] - box[1] < bin_h + 1e-6 and box[3] - orig[3] < bin_h + 1e-6  # on either axis


words = st.sampled_from(
    ["dog", "dogs", "Dog", "a", "the", "car", "cars", "Golden", "red", "STOP", "stop", "İ", "ß", ","]
)


@given(st.lists(words, max_size=30))
@settings(max_examples=300, deadline=None)
def test_every_grounding_span_is_inside_the_caption_and_names_its_source(tokens):
    caption = " ".join(tokens)
    experts = {
        "objects": [
            {"label": "dog", "score": 0.9, "box": [0, 0, 5, 5]},
            {"label": "car", "score": 0.9, "box": [5, 5, 9, 9]},
        ],
        "ocr": [{"text": "stop", "score": 0.9, "box": [1, 1, 2, 2]}],
    }
    for g in ground_mentions(caption, experts):
        assert 0 <= g.span[0] < g.span[1] <= len(caption) and caption[g.span[0] : g.span[1]] == g.phrase
        kind, index = g.source.split("/")
        found = experts[kind][int(index)]
        name = found.get("label") or found.get("text")
        assert name.casefold() in g.phrase.casefold() or g.phrase.casefold().rstrip("s") in name.casefold()


def _naive(vectors: np.ndarray, threshold: float) -> np.ndarray:
    dup = np.full(len(vectors), -1)
    kept: list[int] = []
    for i, v in enumerate(vectors):
        sims = [(float(v @ vectors[k]), k) for k in kept]
        best = max(sims, default=(-np.inf, -1))
        if best[0] > threshold:
            dup[i] = best[1]
        else:
            kept.append(i)
    return dup


def _clustered(rng, n: int) -> np.ndarray:
    """n unit vectors in 8-d around n // 3 centres: many near pairs."""
    base = rng.normal(size=(max(1, n // 3), 8)).astype(np.float32)
    x = base[rng.integers(0, len(base), n)] + 0.3 * rng.normal(size=(n, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@given(st.integers(0, 10_000), st.integers(2, 60), st.integers(2, 8), st.floats(0.5, 0.99))
@settings(max_examples=60, deadline=None)
def test_blocked_greedy_dedup_equals_a_brute_force_reference(seed, n, block_exp, threshold):
    x = _clustered(np.random.default_rng(seed), n)
    [ours] = dd.greedy_duplicates(x, [threshold], block=2**block_exp if 2**block_exp < n else 16)
    kept_ours, kept_ref = ours < 0, _naive(x, threshold) < 0
    assert (kept_ours == kept_ref).all()
    for i in np.flatnonzero(~kept_ours):  # every removed row names a kept row it really is close to
        assert kept_ours[ours[i]] and float(x[i] @ x[ours[i]]) > threshold


@given(st.integers(0, 10_000), st.integers(2, 60), st.integers(2, 8), st.floats(0.5, 0.99))
@settings(max_examples=60, deadline=None)
def test_bf16_screened_greedy_dedup_equals_the_brute_force_reference(seed, n, block_exp, threshold):
    x = _clustered(np.random.default_rng(seed), n)
    block = 2**block_exp if 2**block_exp < n else 16
    [ours] = dd.greedy_duplicates(x, [threshold], block=block, bf16=True)
    assert ((ours < 0) == (_naive(x, threshold) < 0)).all()
    assert (ours == dd.greedy_duplicates(x, [threshold], block=block)[0]).all()


@given(st.integers(0, 10_000), st.integers(2, 60), st.integers(2, 8), st.floats(0.5, 0.99))
@settings(max_examples=60, deadline=None)
def test_confirmed_dedup_without_a_witness_equals_the_greedy_one(seed, n, block_exp, threshold):
    rng = np.random.default_rng(seed)
    x = _clustered(rng, n)
    block = 2**block_exp if 2**block_exp < n else 16
    active = rng.random(n) < 0.9
    [greedy] = dd.greedy_duplicates(x, [threshold], block=block, active=active)
    assert (dd.confirmed_duplicates(x, threshold, active, None, block) == greedy).all()


@given(st.integers(0, 10_000), st.integers(2, 40), st.floats(0.5, 0.95))
@settings(max_examples=60, deadline=None)
def test_a_rejected_look_alike_does_not_hide_the_original(seed, n, threshold):
    """With a witness that refuses pairs of different parity, every removed row names the most
    similar kept row of its own parity in the radius, and no row of its parity in the radius was
    left kept before it (checked against a brute-force loop)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    x = x[rng.integers(0, max(1, n // 2), n)] + 0.2 * rng.normal(size=(n, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ours = dd.confirmed_duplicates(x, threshold, np.ones(n, bool), lambda i, j: i % 2 == j % 2, block=8)
    kept: list[int] = []
    for i in range(n):
        options = sorted((-float(x[i] @ x[k]), k) for k in kept if k % 2 == i % 2 and float(x[i] @ x[k]) > threshold)
        expected = options[0][1] if options else -1
        assert ours[i] == expected
        if expected < 0:
            kept.append(i)
