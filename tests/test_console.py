"""A run's console: what it raises by design is silenced, what nobody planned is kept."""

import logging
import warnings

from demopsd.runtime.loggers import quiet_known_notices


def test_notices_a_run_raises_by_design_are_silenced_and_others_kept(caplog):
    by_design = [
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
        "Found 33 module(s) in eval mode at the start of training. This may lead to unexpected behavior.",
        "You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a datamodule.",
        "Experiment logs directory /x/ exists and is not empty. Previous log files will be deleted!",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_notices()
        for message in [*by_design, "a warning nobody planned"]:
            warnings.warn(message, UserWarning)
    assert [str(w.message) for w in caught] == ["a warning nobody planned"]

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=rank_zero.name):
        rank_zero.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
