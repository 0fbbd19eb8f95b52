"""Run-level analyses of a finished batch run: pure functions of :class:`batch.records.ItemRecord`.

The job's merge step calls :func:`build_run_outputs` once all shards are complete and writes the
returned ``{key relative to the run prefix: bytes}`` objects; nothing here touches storage, so the
analyses are tested on records built in memory. The UI loads the similarity index back with
:class:`medxplain_contract.similarity.SimilarityIndex`.
"""

from batch.analyses.run import SUMMARY_KEY, build_run_outputs
from batch.analyses.similarity import Neighbour, SimilarityIndex

__all__ = ["SUMMARY_KEY", "Neighbour", "SimilarityIndex", "build_run_outputs"]
