"""Captions for a scene from a template grammar that names every attribute, in paraphrases."""

from __future__ import annotations

import numpy as np

from core.synth.scene import Scene

# ------------------------------------------------------------------------------ the captions
_VEHICLE_WORDS = {
    "car": ("car", "sedan", "saloon car"),
    "truck": ("truck", "lorry"),
    "bus": ("bus", "coach"),
    "motorbike": ("motorbike", "motorcycle"),
}
_SIDE_WORDS = {"left_to_right": "from left to right", "right_to_left": "from right to left"}
_ACTION_PHRASES = {
    "oncoming": ("comes towards us in the oncoming lane", "approaches from the opposite direction",
                 "drives past us going the other way", "is oncoming in the other lane"),
    "overtaking": ("overtakes us on the left", "passes us on the left",
                   "overtakes and pulls in ahead of us", "speeds past on our left"),
    "turning_left": ("ahead turns left", "in front of us turns left", "signals and turns left",
                     "makes a left turn ahead"),
    "turning_right": ("ahead turns right", "in front of us turns right", "signals and turns right",
                      "makes a right turn ahead"),
    "braking": ("ahead brakes to a stop", "in front of us brakes and stops",
                "slows down and stops ahead of us", "ahead comes to a halt"),
    "crossing": ("crosses the road ahead", "drives across the road in front of us",
                 "crosses our path {side}", "drives across the junction {side}"),
}
_TIME_PHRASES = {
    "day": ("in daylight", "during the day", "in the daytime"),
    "dusk": ("at dusk", "at sunset", "in the evening twilight"),
    "night": ("at night", "after dark", "in the dark"),
}
_WEATHER_PHRASES = {
    "clear": ("in clear weather", "under a clear sky", "on a dry road"),
    "rain": ("in the rain", "in heavy rain", "on a wet rainy road"),
    "fog": ("in fog", "in thick fog", "in the mist"),
}
# The second event, as a subordinate clause ("... while X") and as a main clause ("..., and X").
_EXTRA_CLAUSES = {
    "none": (("",), ("",)),
    "pedestrian": (("while a pedestrian crosses the road", "as a person walks across the street"),
                   ("a pedestrian crosses the road", "someone walks across the street")),
    "light_to_green": (("as the traffic light turns green", "while the signal changes from red to green"),
                       ("the traffic light turns from red to green", "the light goes green")),
    "light_to_red": (("as the traffic light turns red", "while the signal changes from green to red"),
                     ("the traffic light turns from green to red", "the light goes red")),
}
_TEMPLATES = (
    "{subject} {action} {time} {weather}{while_extra}",
    "{time} {weather} {subject} {action}{while_extra}",
    "{weather} {time}, {subject} {action}{and_extra}",
    "dashcam {time} {weather}: {subject} {action}{and_extra}",
    "{subject} {action} {weather} {time}{and_extra}",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def scene_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One paraphrase naming the vehicle, colour, action, time of day, weather and extra event."""
    subordinate, main = _EXTRA_CLAUSES[scene.extra]
    words = {
        "subject": f"a {scene.colour} {_pick(rng, _VEHICLE_WORDS[scene.vehicle])}",
        "action": _pick(rng, _ACTION_PHRASES[scene.action]).format(side=_SIDE_WORDS[scene.crossing_side]),
        "time": _pick(rng, _TIME_PHRASES[scene.time]),
        "weather": _pick(rng, _WEATHER_PHRASES[scene.weather]),
        "while_extra": f" {_pick(rng, subordinate)}" if scene.extra != "none" else "",
        "and_extra": f", and {_pick(rng, main)}" if scene.extra != "none" else "",
    }
    return _pick(rng, _TEMPLATES).format(**words)


def scene_captions(scene: Scene, count: int, rng: np.random.Generator) -> list[str]:
    """`count` different paraphrases of the same scene (the grammar has hundreds per scene)."""
    captions: list[str] = []
    for _ in range(50 * count):
        caption = scene_caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                break
    return captions

