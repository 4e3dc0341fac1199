"""One progress bar for long work (capturing an 8B step, planning many budgets): tqdm, or nothing when off."""
from __future__ import annotations


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool = True, unit: str = "it"):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, leave=False)
