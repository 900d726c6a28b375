"""The synthetic driving-scene dataset: ego-view road clips rendered with numpy, encoded as H.264.

The demo and the tests need a video-text retrieval dataset that exists offline, runs on a CPU and
is hard enough that distillation, tuning and quantization change the numbers. Each clip is a
dashcam view of a road: one vehicle event (a car, truck, bus or motorbike in one of six colours,
oncoming, overtaking, turning, braking to a stop or crossing), optionally a second event (a
pedestrian crossing or a traffic light changing), at day, dusk or night, in clear weather, rain
or fog. Events start and end at random frames inside the clip, so which frames matter differs
per video (what AFA's frame weighting is for). Captions come from a template grammar that names
every attribute, in several paraphrases per clip.

Everything is drawn from numpy generators seeded by (config seed, video index): the same config
gives byte-identical captions and identical frames, whichever worker renders which clip.

Modules: `scene` (what happens in a clip), `captions` (the template grammar), `render` (numpy
frames), `dataset` (H.264 files, splits and the manifest).
"""

from core.synth.captions import scene_caption, scene_captions
from core.synth.dataset import generate_dataset, split_names, write_mp4
from core.synth.render import render_scene
from core.synth.scene import ACTIONS, COLOURS, EXTRAS, SIDES, TIMES, VEHICLES, WEATHERS, Scene, sample_scene

__all__ = ["ACTIONS", "COLOURS", "EXTRAS", "SIDES", "TIMES", "VEHICLES", "WEATHERS", "Scene", "generate_dataset",
           "render_scene", "sample_scene", "scene_caption", "scene_captions", "split_names", "write_mp4"]
