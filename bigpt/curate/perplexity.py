"""The perplexity stage's datatrove blocks: score, find the band, keep the band.

The scoring job copies the previous pass's documents with ``metadata.perplexity`` set and
writes each task's scores; a one-task job turns all scores into the band's two bounds
(``band.json``); the next pass reads the scored documents and keeps those inside the band.
"""

import json
import math
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.batching import batched

from bigpt.curate.reference import ReferenceFiles, ReferenceModel
from bigpt.errors import BigptError
from bigpt.paths import write_atomically

SCORE = "perplexity"
"""The metadata key of a document's score."""

DOCUMENTS_PER_CALL = 256


class PerplexityScorer(PipelineStep):
    name = "📉 Perplexity"
    type = "📊 - STATS"

    def __init__(self, files: ReferenceFiles, scores: str, *, max_tokens: int, batch_size: int):
        super().__init__()
        self.files, self.scores = files, Path(scores)
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def run(self, data, rank: int = 0, world_size: int = 1):
        scores = []
        with ReferenceModel(self.files, max_tokens=self.max_tokens, batch_size=self.batch_size, task=rank) as model:
            for batch in batched(data, DOCUMENTS_PER_CALL):
                for doc, score in zip(batch, model.perplexities([doc.text for doc in batch])):
                    doc.metadata[SCORE] = score
                    scores.append(score)
                    yield doc
        self.scores.mkdir(parents=True, exist_ok=True)
        write_atomically(self.scores / f"{rank:05d}.json", json.dumps(scores))


class PerplexityBand(PipelineStep):
    """One task: the scores of all ``tasks`` → [low, high] at the two percentiles."""

    name = "📉 Perplexity band"
    type = "📊 - STATS"

    def __init__(self, scores: str, tasks: int, band: str, min_percentile: float, max_percentile: float):
        super().__init__()
        self.scores, self.tasks, self.band = Path(scores), tasks, Path(band)
        self.percentiles = (min_percentile, max_percentile)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import numpy as np

        files = sorted(self.scores.glob("*.json"))
        if len(files) != self.tasks:
            raise BigptError(
                f"{self.scores} has the scores of {len(files)} of {self.tasks} tasks: the "
                "scoring job did not finish; re-run the same command to resume it."
            )
        scores = np.array([score for path in files for score in json.loads(path.read_text())], dtype=np.float64)
        low, high = np.percentile(scores, self.percentiles).tolist() if scores.size else (math.inf, -math.inf)
        write_atomically(
            self.band,
            json.dumps(
                {"percentiles": list(self.percentiles), "perplexity": [low, high], "documents": int(scores.size)}
            ),
        )
        return iter(())


class PerplexityBandFilter(BaseFilter):
    """Keeps documents whose ``metadata.perplexity`` lies in the band (bounds included)."""

    name = "📉 Perplexity band"

    def __init__(self, band: str):
        super().__init__()
        self.band = Path(band)
        self.bounds: tuple[float, float] | None = None  # read at the first document: the band job writes it

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.bounds is None:
            low, high = json.loads(self.band.read_text())["perplexity"]
            self.bounds = low, high
        low, high = self.bounds
        score = doc.metadata[SCORE]
        if score > high:
            return False, "perplexity_above_band"
        if score < low:
            return False, "perplexity_below_band"
        return True
