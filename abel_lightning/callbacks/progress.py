"""This rank's sampling rates on Lightning's progress bar, where the running loop has one."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

_BAR_DESCRIPTIONS = {"predict": "Predicting", "test": "Testing"}


def show_on_progress_bar(trainer: L.Trainer, stage: str, text: str) -> bool:
    """Put ``text`` on the running loop's bar (TQDM: postfix; Rich: description); False when there is no such bar
    (progress bar disabled, rank > 0, or sampling inside ``fit``, which has no bar for it)."""
    callback = trainer.progress_bar_callback
    if callback is None or not callback.is_enabled or trainer.state.fn != stage or stage not in _BAR_DESCRIPTIONS:
        return False
    if isinstance(callback, TQDMProgressBar):
        bar = callback.predict_progress_bar if stage == "predict" else callback.test_progress_bar
        bar.set_postfix_str(text, refresh=False)
        return True
    if isinstance(callback, RichProgressBar):
        task = getattr(callback, f"{stage}_progress_bar_id", None)
        if callback.progress is None or task is None:
            return False
        callback.progress.update(task, description=f"{_BAR_DESCRIPTIONS[stage]} · {text}")
        return True
    return False
