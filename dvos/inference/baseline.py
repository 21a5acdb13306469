"""The first-frame-copy baseline: every frame predicted as the reference masks.

The floor any VOS model must clear: it scores what the first frame alone explains (static objects,
large objects that barely move). Objects that first appear later (YouTube-VOS) are pasted in from
the frame where they appear on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dvos.data.vos import VOSSequence


def copy_first_frame(sequence: VOSSequence) -> Iterator[np.ndarray]:
    """Yield the predicted `H × W` uint8 id mask of every frame, in order (memory: one mask)."""
    prediction = np.zeros(sequence.size, dtype=np.uint8)
    for index in range(len(sequence)):
        for object_id in sequence.objects_starting_at(index):
            prediction = prediction.copy()
            prediction[sequence.reference_mask(object_id)] = object_id
        yield prediction
