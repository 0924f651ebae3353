"""Plant each bug the mutation probe of issue 14 found, run the unit tests, expect a failure, restore.

Usage: python tests/plant_bugs.py (in a checkout whose editable install it is; it edits files in place
and puts them back)."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # run from a scratch checkout: it edits files in place
BUGS = [
    (
        "pHash distance one above the threshold counts",
        "stages/dedup/decide.py",
        "t = 1.0 - 2.0 * (phash_max_distance + 0.5) / 64.0",
        "t = 1.0 - 2.0 * (phash_max_distance + 1.5) / 64.0",
    ),
    ("funnel imbalance check removed", "pipeline/stats.py", "if complete and not balanced:", "if False:"),
    (
        "qa box_validity always 1.0",
        "stages/qa.py",
        'scores["box_validity"] = round(len(valid) / len(sample.grounding), 4) if sample.grounding else 1.0',
        'scores["box_validity"] = 1.0',
    ),
    (
        "normaliser's own pixel limit removed",
        "stages/image_normalize.py",
        "if width * height > self.max_image_pixels:",
        "if False:",
    ),
    (
        "Kosmos-2 end bin off by one",
        "stages/dialects.py",
        "self._bin(y1 - 1e-6, height) * self.BINS + self._bin(x1 - 1e-6, width)",
        "self._bin(y1 - 1e-6, height) * self.BINS + self._bin(x1 - 1e-6, width) - 1",
    ),
    (
        "LLaVA-1.5 square padding at the top left, not centred",
        "stages/dialects.py",
        "return 1 / side, 1 / side, float((side - width) // 2), float((side - height) // 2)",
        "return 1 / side, 1 / side, 0.0, 0.0",
    ),
    (
        "Qwen2.5-VL frame without smart_resize's max_pixels",
        "stages/dialects.py",
        "if h * w > self.max_pixels:",
        "if False:",
    ),
    (
        "Florence-2 read at bin edges, not centres",
        "stages/dialects.py",
        "return [(v + 0.5) * (width, height)[i % 2] / 1000",
        "return [v * (width, height)[i % 2] / 1000",
    ),
    (
        "DynRefer view choice inverted",
        "stages/regions.py",
        "scored.sort(key=lambda item: (item[0], item[1]), reverse=True)",
        "scored.sort(key=lambda item: (item[0], item[1]))",
    ),
    ("size cap without Content-Length removed", "stages/url_screen.py", "if size > max_bytes:", "if False:"),
    (
        "right padding in the transformers captioner",
        "stages/fuse.py",
        'tokenizer.padding_side = "left"',
        'tokenizer.padding_side = "right"',
    ),
    (
        "IoU voting with an unweighted mean",
        "stages/perceive.py",
        'weights = np.array([g[1].get("score", 1.0) for g in group]) + 1e-9',
        "weights = np.ones(len(group))",
    ),
    (
        "CLIP score from the first chunk only",
        "stages/qa.py",
        "scores.append(round(float((txt @ img.T).mean()), 4))",
        "scores.append(round(float((txt @ img.T)[0].mean()), 4))",
    ),
    (
        "download_unit without the guarded opener",
        "stages/ingest.py",
        "urllib.request.install_opener(\n"
        "        guarded_opener(cfg.allow_private_addresses, cfg.max_download_bytes, allow_files, deadline)\n"
        "    )",
        "pass",
    ),
    (
        "OCR grounding spans from caption.lower()",
        "stages/ground.py",
        "found = re.search(loose, caption, re.IGNORECASE)",
        "found = re.search(loose, caption.lower(), re.IGNORECASE)",
    ),
]


def main() -> None:
    results = []
    for name, file, old, new in BUGS:
        path = ROOT / file
        original = path.read_text()
        assert old in original, (name, old)
        path.write_text(original.replace(old, new, 1))
        try:
            start = time.time()
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/unit"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            failed = [x for x in proc.stdout.splitlines() if x.startswith("FAILED")]
            results.append((name, proc.returncode != 0, failed[:1], round(time.time() - start, 1)))
            print(results[-1], flush=True)
        finally:
            path.write_text(original)
    print("caught", sum(r[1] for r in results), "of", len(results))


if __name__ == "__main__":
    main()
