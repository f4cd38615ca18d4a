"""`evaluate` metric for speculative-decoding acceptance: `evaluate.load("path/to/acceptance.py")`.

predictions: per sequence, the tokens committed at every decoding step (`BlockPilotGenerateOutput.acceptance_lengths`);
references: per sequence, the block size used (`BlockPilotGenerateOutput.block_sizes`).
"""

import datasets
import evaluate

from blockpilot_hf.metrics import acceptance_metrics

_DESCRIPTION = "Mean acceptance length (tau), its histogram and the full-block rate of block speculative decoding."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of ints, tokens committed per decoding step, one list per sequence.
    references: list of ints, the block size used for each sequence.
Returns:
    mean_tau, mean_tau_per_sequence, histogram, steps, tokens, full_block_rate.
"""


class Acceptance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int32")), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        return acceptance_metrics([list(p) for p in predictions], list(references))
