"""Run-level analyses of a finished batch run: pure functions of :class:`batch.records.ItemRecord`.

The job's merge step streams the verified records into :class:`RunAnalyses` once all shards are
complete and writes the returned ``{key relative to the run prefix: bytes or file}`` objects;
nothing here touches object storage, so the analyses are tested on records built in memory
(:func:`build_run_outputs`). The UI loads the similarity index back with
:class:`medxplain_contract.similarity.SimilarityIndex`.
"""

from batch.analyses.run import SUMMARY_KEY, RunAnalyses, build_run_outputs
from batch.analyses.similarity import Neighbour, SimilarityIndex

__all__ = ["SUMMARY_KEY", "Neighbour", "RunAnalyses", "SimilarityIndex", "build_run_outputs"]
