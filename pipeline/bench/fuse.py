"""`denseforge bench fuse`: the openai backend against a loopback stub at several concurrencies,
the template backend, grounding and qa per sample."""

from __future__ import annotations

import time
from typing import Any

from denseforge.pipeline.chat_stub import StubChatServer
from denseforge.pipeline.demo import load_photo

BENCH_CAPTION = (
    "Two dogs run across a wet street in front of a red car while a woman holds an umbrella "
    'under a sign that reads "STOP".'
)


def bench_fuse(
    samples: int = 256, latency_s: float = 0.05, concurrencies: tuple[int, ...] = (1, 8, 32)
) -> dict[str, Any]:
    """Captions/s of the openai backend against a loopback server with a fixed latency, at several
    client concurrencies (ideal: concurrency / latency), the template backend's samples/s, and the
    cost of grounding and qa per sample."""
    import io

    from denseforge.stages.fuse import OpenAIBackendConfig, OpenAICaptioner, PromptTemplate, TemplateCaptioner
    from denseforge.stages.ground import ground_mentions
    from denseforge.stages.qa import QaConfig, assess
    from denseforge.stages.sample import Sample

    buf = io.BytesIO()
    load_photo("coffee").convert("RGB").resize((448, 299)).save(buf, format="JPEG")
    image = buf.getvalue()
    experts = {
        "objects": [
            {"label": "dog", "score": 0.9, "box": [10.0, 20.0, 200.0, 280.0]},
            {"label": "dog", "score": 0.8, "box": [220.0, 40.0, 400.0, 290.0]},
            {"label": "car", "score": 0.7, "box": [0.0, 150.0, 448.0, 299.0]},
            {"label": "person", "score": 0.6, "box": [300.0, 10.0, 380.0, 200.0]},
        ],
        "ocr": [{"text": "STOP", "score": 0.99, "box": [50.0, 5.0, 120.0, 40.0], "polygon": []}],
        "tags": [{"label": "street", "score": 0.5}, {"label": "umbrella", "score": 0.3}],
    }
    batch = [
        Sample(key=f"{i:012d}", width=448, height=299, sha256="0" * 64, alt_text="dogs in the rain", experts=experts)
        for i in range(samples)
    ]
    images = [image] * samples
    result: dict[str, Any] = {"benchmark": "fuse", "samples": samples, "server_latency_s": latency_s, "openai": {}}
    prompt = PromptTemplate.load(None, 192)
    with StubChatServer(BENCH_CAPTION, latency_s, own_process=True) as url:
        for c in concurrencies:
            cfg = OpenAIBackendConfig(base_url=url, model="stub", max_retries=0, timeout_s=30, concurrency=c)
            captioner = OpenAICaptioner(prompt, cfg)
            start = time.perf_counter()
            out = captioner(batch, images)
            seconds = time.perf_counter() - start
            errors = sum(1 for o in out if o.error)
            ideal = c / latency_s if latency_s > 0 else None
            result["openai"][str(c)] = {
                "captions_per_s": round(samples / seconds, 1),
                "errors": errors,
                "ideal_captions_per_s": round(ideal, 1) if ideal else None,
                "fraction_of_ideal": round(samples / seconds / ideal, 3) if ideal else None,
            }
    start = time.perf_counter()
    TemplateCaptioner()(batch, images)
    result["template_samples_per_s"] = round(samples / (time.perf_counter() - start), 1)
    for sample in batch:
        sample.caption = BENCH_CAPTION
    start = time.perf_counter()
    for sample in batch:
        sample.grounding = ground_mentions(BENCH_CAPTION, sample.experts)
    result["ground_ms_per_sample"] = round(1000 * (time.perf_counter() - start) / samples, 3)
    settings = QaConfig()
    start = time.perf_counter()
    reports = [assess(sample, settings) for sample in batch]
    result["qa_ms_per_sample"] = round(1000 * (time.perf_counter() - start) / samples, 3)
    result["qa_passed"] = sum(r.passed for r in reports)
    return result
