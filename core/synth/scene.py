"""What happens in a synthetic clip: the vehicle event, the optional second event, time and
weather, and the frames where each event starts and ends."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VEHICLES = ("car", "truck", "bus", "motorbike")
COLOURS = {
    "red": (0.92, 0.08, 0.08),
    "blue": (0.10, 0.25, 0.98),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.07),
    "yellow": (0.99, 0.85, 0.05),
    "green": (0.10, 0.78, 0.15),
}
ACTIONS = ("oncoming", "overtaking", "turning_left", "turning_right", "braking", "crossing")
TIMES = ("day", "dusk", "night")
WEATHERS = ("clear", "rain", "fog")
# The optional second event; "none" leaves the vehicle event alone in the clip.
EXTRAS = ("none", "pedestrian", "light_to_green", "light_to_red")
_EXTRA_PROBS = (0.4, 0.3, 0.15, 0.15)
SIDES = ("left_to_right", "right_to_left")


# --------------------------------------------------------------------------------- the scene
@dataclass(frozen=True)
class Scene:
    """Everything that decides one clip; frames are a pure function of it and the resolution."""

    vehicle: str
    colour: str
    action: str
    time: str
    weather: str
    extra: str
    num_frames: int
    fps: int
    event: tuple[int, int]  # first and last frame of the vehicle event
    extra_event: tuple[int, int] | None  # pedestrian on the road / light switching (amber to final)
    crossing_side: str  # direction of a crossing vehicle
    pedestrian_side: str
    detail_seed: int  # skyline, rain drops, clothes: variation that no caption mentions


def _window(rng: np.random.Generator, num_frames: int, low: float, high: float) -> tuple[int, int]:
    """A random [start, end] frame span covering a `low`..`high` fraction of the clip."""
    if num_frames <= 2:
        return 0, num_frames - 1
    length = max(2, round(rng.uniform(low, high) * num_frames))
    start = int(rng.integers(0, num_frames - length + 1))
    return start, start + length - 1


def sample_scene(rng: np.random.Generator, num_frames: int, fps: int) -> Scene:
    """Draw one clip's attributes and event timing, each attribute uniform and independent."""
    extra = EXTRAS[rng.choice(len(EXTRAS), p=_EXTRA_PROBS)]
    if extra == "pedestrian":
        extra_event = _window(rng, num_frames, 0.4, 0.8)
    elif extra != "none":
        # The switch happens inside the clip, so both the old and the new state are on screen.
        switch = round(rng.uniform(0.3, 0.7) * (num_frames - 1))
        amber = max(1, round(0.15 * num_frames)) if extra == "light_to_red" else 0
        extra_event = (max(0, switch - amber), switch)
    else:
        extra_event = None
    return Scene(
        vehicle=VEHICLES[rng.integers(len(VEHICLES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        action=ACTIONS[rng.integers(len(ACTIONS))],
        time=TIMES[rng.integers(len(TIMES))],
        weather=WEATHERS[rng.integers(len(WEATHERS))],
        extra=extra,
        num_frames=num_frames,
        fps=fps,
        event=_window(rng, num_frames, 0.45, 0.85),
        extra_event=extra_event,
        crossing_side=SIDES[rng.integers(2)],
        pedestrian_side=SIDES[rng.integers(2)],
        detail_seed=int(rng.integers(2**31)),
    )

