"""A scene rendered as an ego-view road clip with numpy: uint8 frames [T, H, W, 3]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.synth.scene import COLOURS, Scene

# ----------------------------------------------------------------------------- the rendering
# Lighting per time of day: sky at the top and at the horizon, the light falling on surfaces,
# and the colour fog fades to.
_SKY = {
    "day": ((0.30, 0.55, 0.95), (0.75, 0.86, 0.99)),
    "dusk": ((0.22, 0.16, 0.42), (0.99, 0.52, 0.25)),
    "night": ((0.01, 0.01, 0.05), (0.06, 0.07, 0.14)),
}
_AMBIENT = {"day": 1.0, "dusk": 0.62, "night": 0.16}
_FOG = {"day": (0.76, 0.77, 0.79), "dusk": (0.62, 0.50, 0.50), "night": (0.20, 0.20, 0.22)}
_ASPHALT = np.array((0.36, 0.36, 0.38), np.float32)
_VERGE = np.array((0.46, 0.42, 0.30), np.float32)
_MARKING = np.array((0.92, 0.92, 0.86), np.float32)
_CLOTHES = ((1.0, 0.45, 0.0), (0.95, 0.1, 0.75), (0.0, 0.85, 0.9), (0.6, 0.2, 0.9))
_SKIN = (0.85, 0.65, 0.5)

_HORIZON = 0.40  # horizon row as a fraction of the height
_LANE = 0.60  # lane width at the bottom row, in units of the shorter side
_ROAD_HALF = 1.5  # three lanes: oncoming (u=-1), ours (u=0), a right lane (u=1)
_SKY_DEPTH = 1e3
_PEDESTRIAN_Z = 1.9  # a crossing pedestrian's depth (the bottom row is z = 1)

# Vehicle sprites in lane units, origin at the ground below the vehicle's centre, y up.
# ("rect", x0, x1, y0, y1, part) and ("disc", cx, cy, rx, ry, part); the part picks the colour.
_R, _D = "rect", "disc"
_BACK = {  # seen from behind
    "car": [(_R, -0.30, -0.17, 0.0, 0.1, "tyre"), (_R, 0.17, 0.30, 0.0, 0.1, "tyre"),
            (_R, -0.34, 0.34, 0.07, 0.30, "body"), (_R, -0.26, 0.26, 0.30, 0.50, "body"),
            (_R, -0.21, 0.21, 0.32, 0.47, "glass"),
            (_R, -0.32, -0.20, 0.18, 0.25, "lamp_l"), (_R, 0.20, 0.32, 0.18, 0.25, "lamp_r")],
    "truck": [(_R, -0.36, -0.20, 0.0, 0.12, "tyre"), (_R, 0.20, 0.36, 0.0, 0.12, "tyre"),
              (_R, -0.44, 0.44, 0.10, 1.00, "body"), (_R, -0.015, 0.015, 0.14, 0.96, "trim"),
              (_R, -0.42, -0.30, 0.13, 0.20, "lamp_l"), (_R, 0.30, 0.42, 0.13, 0.20, "lamp_r")],
    "bus": [(_R, -0.36, -0.20, 0.0, 0.12, "tyre"), (_R, 0.20, 0.36, 0.0, 0.12, "tyre"),
            (_R, -0.43, 0.43, 0.07, 0.88, "body"), (_R, -0.36, 0.36, 0.52, 0.80, "glass"),
            (_R, -0.41, -0.29, 0.14, 0.22, "lamp_l"), (_R, 0.29, 0.41, 0.14, 0.22, "lamp_r")],
    "motorbike": [(_R, -0.05, 0.05, 0.0, 0.28, "tyre"), (_R, -0.13, 0.13, 0.18, 0.40, "body"),
                  (_R, -0.14, 0.14, 0.38, 0.70, "body"), (_D, 0.0, 0.78, 0.095, 0.095, "tyre"),
                  (_R, -0.04, 0.04, 0.25, 0.33, "lamp_l")],
}
_FRONT = {  # seen from the front: windscreens, head lamps
    "car": [(_R, -0.30, -0.17, 0.0, 0.1, "tyre"), (_R, 0.17, 0.30, 0.0, 0.1, "tyre"),
            (_R, -0.34, 0.34, 0.07, 0.30, "body"), (_R, -0.26, 0.26, 0.30, 0.50, "body"),
            (_R, -0.23, 0.23, 0.30, 0.48, "glass"), (_R, -0.20, 0.20, 0.12, 0.16, "trim"),
            (_R, -0.32, -0.21, 0.18, 0.25, "lamp_l"), (_R, 0.21, 0.32, 0.18, 0.25, "lamp_r")],
    "truck": [(_R, -0.36, -0.20, 0.0, 0.12, "tyre"), (_R, 0.20, 0.36, 0.0, 0.12, "tyre"),
              (_R, -0.44, 0.44, 0.72, 1.00, "trim"), (_R, -0.42, 0.42, 0.10, 0.74, "body"),
              (_R, -0.36, 0.36, 0.44, 0.68, "glass"), (_R, -0.30, 0.30, 0.16, 0.30, "trim"),
              (_R, -0.40, -0.30, 0.16, 0.24, "lamp_l"), (_R, 0.30, 0.40, 0.16, 0.24, "lamp_r")],
    "bus": [(_R, -0.36, -0.20, 0.0, 0.12, "tyre"), (_R, 0.20, 0.36, 0.0, 0.12, "tyre"),
            (_R, -0.43, 0.43, 0.07, 0.88, "body"), (_R, -0.38, 0.38, 0.36, 0.82, "glass"),
            (_R, -0.41, -0.29, 0.14, 0.22, "lamp_l"), (_R, 0.29, 0.41, 0.14, 0.22, "lamp_r")],
    "motorbike": [(_R, -0.05, 0.05, 0.0, 0.28, "tyre"), (_R, -0.13, 0.13, 0.18, 0.40, "body"),
                  (_R, -0.14, 0.14, 0.38, 0.70, "body"), (_D, 0.0, 0.78, 0.095, 0.095, "tyre"),
                  (_R, -0.05, 0.05, 0.30, 0.38, "lamp_l")],
}
_SIDE = {  # seen from the side, facing +x
    "car": [(_R, -0.60, 0.60, 0.08, 0.30, "body"), (_R, -0.34, 0.24, 0.30, 0.50, "body"),
            (_R, -0.29, -0.05, 0.32, 0.47, "glass"), (_R, 0.00, 0.20, 0.32, 0.47, "glass"),
            (_D, -0.38, 0.09, 0.10, 0.10, "tyre"), (_D, 0.38, 0.09, 0.10, 0.10, "tyre"),
            (_R, 0.54, 0.60, 0.16, 0.22, "lamp_r")],
    "truck": [(_R, -1.00, 0.55, 0.13, 1.00, "body"), (_R, 0.58, 1.00, 0.10, 0.72, "body"),
              (_R, 0.70, 0.96, 0.44, 0.66, "glass"), (_R, -1.00, 1.00, 0.10, 0.16, "trim"),
              (_D, -0.75, 0.11, 0.12, 0.12, "tyre"), (_D, -0.48, 0.11, 0.12, 0.12, "tyre"),
              (_D, 0.78, 0.11, 0.12, 0.12, "tyre"), (_R, 0.94, 1.00, 0.18, 0.26, "lamp_r")],
    "bus": [(_R, -1.25, 1.25, 0.07, 0.88, "body"),
            *[(_R, x, x + 0.30, 0.50, 0.78, "glass") for x in (-1.15, -0.75, -0.35, 0.05, 0.45)],
            (_R, 0.85, 1.18, 0.30, 0.80, "glass"),
            (_D, -0.85, 0.11, 0.12, 0.12, "tyre"), (_D, 0.80, 0.11, 0.12, 0.12, "tyre"),
            (_R, 1.19, 1.25, 0.15, 0.24, "lamp_r")],
    "motorbike": [(_D, -0.30, 0.14, 0.14, 0.14, "tyre"), (_D, 0.30, 0.14, 0.14, 0.14, "tyre"),
                  (_R, -0.28, 0.28, 0.20, 0.40, "body"), (_R, -0.13, 0.08, 0.38, 0.70, "body"),
                  (_D, -0.01, 0.78, 0.095, 0.095, "tyre"), (_R, 0.25, 0.32, 0.32, 0.40, "lamp_r")],
}


@dataclass
class _Pose:
    """Where a vehicle is in one frame: lane coordinate u, depth z, and what it shows."""

    u: float
    z: float
    view: str  # "rear", "front" or "side"
    facing_right: bool = True  # side view only
    brake: bool = False
    indicator: str | None = None  # "l" or "r" while blinking


def _smooth(p: float) -> float:
    p = min(max(p, 0.0), 1.0)
    return p * p * (3 - 2 * p)


def _geo(a: float, b: float, p: float) -> float:
    """Interpolate depth geometrically, so screen size changes at a steady rate."""
    return a * (b / a) ** p


def _vehicle_pose(scene: Scene, frame: int, edge_u: Callable[[float], float]) -> _Pose | None:
    """The vehicle event as a trajectory; `edge_u(z)` is the lane coordinate of the frame edge."""
    start, end = scene.event
    if frame < start or (frame > end and scene.action != "braking"):
        return None
    p = (frame - start) / max(1, end - start) if frame <= end else 1.0
    blink = (frame // max(1, round(scene.fps / 3))) % 2 == 0
    if scene.action == "oncoming":
        return _Pose(-1.0, _geo(6.0, 0.75, p), "front")
    if scene.action == "overtaking":  # from behind on our left, then pulls in ahead of us
        merge = _smooth((p - 0.55) / 0.35)
        return _Pose(-1.0 + merge, _geo(0.8, 5.0, p), "rear", indicator="r" if 0 < merge < 1 and blink else None)
    if scene.action in ("turning_left", "turning_right"):
        sign = -1.0 if scene.action == "turning_left" else 1.0
        side = "l" if sign < 0 else "r"
        if p < 0.35:  # catch up with it while it signals
            return _Pose(0.0, _geo(5.0, 2.2, p / 0.35), "rear", indicator=side if blink else None)
        q = (p - 0.35) / 0.65
        if q < 0.3:
            return _Pose(sign * 0.3 * q, 2.2 + 0.5 * q, "rear", indicator=side if blink else None)
        z = 2.2 + 0.5 * q
        return _Pose(sign * (0.1 + (edge_u(z) + 1.3) * _smooth((q - 0.3) / 0.7)), z, "side", facing_right=sign > 0)
    if scene.action == "braking":  # it brakes, we close in and stop behind it
        return _Pose(0.0, 1.6 + 3.4 * (1 - p) ** 2, "rear", brake=p >= 0.3)
    # crossing: sideways across the whole frame at a fixed depth
    z = 2.2
    reach = edge_u(z) + 1.3
    rightwards = scene.crossing_side == "left_to_right"
    return _Pose((-reach + 2 * reach * p) * (1 if rightwards else -1), z, "side", facing_right=rightwards)


class _Canvas:
    """One frame being painted: surface colour, additive light (glow) and depth per pixel."""

    def __init__(self, rgb: np.ndarray, depth: np.ndarray):
        self.rgb, self.depth = rgb, depth
        self.glow = np.zeros_like(rgb)
        self.height, self.width = depth.shape

    def _paint(self, y0: int, x0: int, alpha: np.ndarray, colour, z: float) -> None:
        y1, x1 = y0 + alpha.shape[0], x0 + alpha.shape[1]
        a = alpha[..., None]
        region = self.rgb[y0:y1, x0:x1]
        region += (np.asarray(colour, np.float32) - region) * a
        depth = self.depth[y0:y1, x0:x1]
        depth[alpha > 0.5] = z

    def rect(self, x0: float, x1: float, y0: float, y1: float, colour, z: float) -> None:
        """Anti-aliased by pixel coverage, so slow motion moves smoothly at 64 pixels."""
        j0, j1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.width)
        i0, i1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.height)
        if j0 >= j1 or i0 >= i1:
            return
        xs, ys = np.arange(j0, j1, dtype=np.float32), np.arange(i0, i1, dtype=np.float32)
        cover_x = np.clip(np.minimum(x1, xs + 1) - np.maximum(x0, xs), 0, 1)
        cover_y = np.clip(np.minimum(y1, ys + 1) - np.maximum(y0, ys), 0, 1)
        self._paint(i0, j0, cover_y[:, None] * cover_x[None, :], colour, z)

    def disc(self, cx: float, cy: float, rx: float, ry: float, colour, z: float) -> None:
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        j0, j1 = max(int(cx - rx - 1), 0), min(int(cx + rx + 2), self.width)
        i0, i1 = max(int(cy - ry - 1), 0), min(int(cy + ry + 2), self.height)
        if j0 >= j1 or i0 >= i1:
            return
        xs = (np.arange(j0, j1, dtype=np.float32) + 0.5 - cx) / rx
        ys = (np.arange(i0, i1, dtype=np.float32) + 0.5 - cy) / ry
        distance = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
        self._paint(i0, j0, np.clip((1 - distance) * min(rx, ry) + 0.5, 0, 1), colour, z)

    def add_glow(self, cx: float, cy: float, radius: float, colour, strength: float) -> None:
        radius = max(radius, 0.75)
        j0, j1 = max(int(cx - 3 * radius), 0), min(int(cx + 3 * radius + 1), self.width)
        i0, i1 = max(int(cy - 3 * radius), 0), min(int(cy + 3 * radius + 1), self.height)
        if j0 >= j1 or i0 >= i1:
            return
        xs = np.arange(j0, j1, dtype=np.float32) + 0.5 - cx
        ys = np.arange(i0, i1, dtype=np.float32) + 0.5 - cy
        falloff = np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * radius**2))
        self.glow[i0:i1, j0:j1] += strength * falloff[..., None] * np.asarray(colour, np.float32)


class _Renderer:
    """Draws a scene frame by frame; the static background is computed once per clip."""

    def __init__(self, scene: Scene, width: int, height: int):
        self.scene, self.width, self.height = scene, width, height
        self.rng = np.random.default_rng(scene.detail_seed)
        unit = min(width, height)
        self.unit, self.cx = unit, width / 2
        self.horizon = _HORIZON * height
        self.lane_px = _LANE * unit  # lane width at the bottom row (depth z = 1)
        self.light = _AMBIENT[scene.time] * (0.8 if scene.weather == "rain" else 1.0)
        self.night = scene.time == "night"
        self.clothes = _CLOTHES[self.rng.integers(len(_CLOTHES))]

        rows = np.arange(height, dtype=np.float32) + 0.5
        cols = np.arange(width, dtype=np.float32) + 0.5
        scale = np.maximum((rows - self.horizon) / (height - self.horizon), 1e-4)  # 1/z per row
        self.row_z = np.where(rows > self.horizon, 1 / scale, _SKY_DEPTH).astype(np.float32)
        u = (cols[None, :] - self.cx) / (self.lane_px * scale[:, None])  # lane coordinate per pixel
        ground = (rows > self.horizon)[:, None]
        px_per_lane = self.lane_px * scale[:, None]

        def line(u0: float, half_width: float) -> np.ndarray:
            return np.clip((half_width - np.abs(u - u0)) * px_per_lane + 0.5, 0, 1) * ground

        road = np.clip((_ROAD_HALF - np.abs(u)) * px_per_lane + 0.5, 0, 1) * ground
        lit = np.full_like(u, self.light)
        if self.night:  # our headlights: a bright patch on the road close ahead
            lit += 0.55 * np.exp(-((u / 1.1) ** 2)) * np.clip(scale[:, None], 0, 1) ** 1.5
        self.ground_light = (lit * ground)[..., None]
        surface = (_VERGE + (_ASPHALT - _VERGE) * road[..., None]) * self.ground_light
        edges = np.maximum(line(-_ROAD_HALF + 0.06, 0.035), line(_ROAD_HALF - 0.06, 0.035))
        surface += (_MARKING * self.ground_light - surface) * edges[..., None]
        self.dash_alpha = np.maximum(line(-0.5, 0.03), line(0.5, 0.03)) * (self.row_z < 14)[:, None]

        top, bottom = (np.asarray(c, np.float32) for c in _SKY[scene.time])
        t = np.clip(rows / self.horizon, 0, 1)[:, None, None]
        sky = np.broadcast_to(top + (bottom - top) * t, (height, width, 3)).copy()
        if scene.weather == "rain":
            sky += (np.float32(0.5 * self.light + 0.05) - sky) * 0.65  # overcast
        if scene.time == "dusk" and scene.weather == "clear":  # a low sun, half below the horizon
            _Canvas(sky, np.zeros((height, width), np.float32)).disc(
                self.cx + self.rng.uniform(-0.4, 0.4) * unit, self.horizon, 0.07 * unit, 0.07 * unit,
                (1.0, 0.75, 0.35), _SKY_DEPTH)
        self.background = np.where(ground[..., None], surface, sky).astype(np.float32)
        self._draw_skyline()
        self.fog_colour = np.asarray(_FOG[scene.time], np.float32)
        self.ego_phase = np.cumsum([self._ego_speed(f) for f in range(scene.num_frames)]) / scene.fps

    def _draw_skyline(self) -> None:
        """Distant buildings along the horizon: variation that no caption names."""
        x = -self.rng.uniform(0, 0.1) * self.width
        while x < self.width:
            w = self.rng.uniform(0.04, 0.14) * self.width
            h = self.rng.uniform(0.03, 0.16) * self.height
            grey = self.rng.uniform(0.25, 0.5) * np.array((0.9, 0.95, 1.0), np.float32)
            if abs(x + w / 2 - self.cx) > 0.08 * self.width:  # leave the road's vanishing point open
                y0, y1 = int(max(self.horizon - h, 0)), int(np.ceil(self.horizon))
                self.background[y0:y1, max(int(x), 0):int(x + w)] = grey * self.light
            x += w + self.rng.uniform(0, 0.06) * self.width

    def _ego_speed(self, frame: int) -> float:
        """Our speed in lane-dash periods per second; we stop behind a braking vehicle."""
        if self.scene.action != "braking":
            return 2.0
        start, end = self.scene.event
        p = (frame - start) / max(1, end - start)
        return 2.0 * (1 - _smooth((p - 0.3) / 0.7))

    def edge_u(self, z: float) -> float:
        return self.width / 2 / (self.lane_px / z)

    def screen(self, u: float, z: float) -> tuple[float, float, float]:
        """Ground point (u, z) -> pixel x, pixel y, pixels per lane unit."""
        s = 1 / z
        return self.cx + u * self.lane_px * s, self.horizon + s * (self.height - self.horizon), self.lane_px * s

    def render(self) -> np.ndarray:
        frames = np.empty((self.scene.num_frames, self.height, self.width, 3), np.uint8)
        for f in range(self.scene.num_frames):
            frames[f] = self.frame(f)
        return frames

    def frame(self, f: int) -> np.ndarray:
        scene = self.scene
        canvas = _Canvas(self.background.copy(), np.repeat(self.row_z[:, None], self.width, 1))
        dash_on = ((self.row_z + self.ego_phase[f]) % 1.0) < 0.5
        dash = (self.dash_alpha * dash_on[:, None])[..., None]
        canvas.rgb += (_MARKING * self.ground_light - canvas.rgb) * dash

        things = []  # (depth, draw) painted far to near
        pose = _vehicle_pose(scene, f, self.edge_u)
        if pose is not None:
            things.append((pose.z, lambda: self._draw_vehicle(canvas, pose)))
        if scene.extra == "pedestrian" and scene.extra_event[0] <= f <= scene.extra_event[1]:
            things.append((_PEDESTRIAN_Z, lambda: self._draw_pedestrian(canvas, f)))
        for _, draw in sorted(things, key=lambda item: -item[0]):
            draw()
        if scene.extra in ("light_to_green", "light_to_red"):
            self._draw_traffic_light(canvas, f)

        rgb = canvas.rgb
        if scene.weather == "fog":
            haze = (0.82 * (1 - np.exp(-np.maximum(canvas.depth - 0.7, 0) / 3.5)))[..., None]
            rgb = rgb + (self.fog_colour - rgb) * haze
            canvas.glow *= 1 - 0.5 * haze
        rgb = rgb + canvas.glow
        if scene.weather == "rain":
            rgb = self._rain(rgb, f)
        return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)

    def _rain(self, rgb: np.ndarray, f: int) -> np.ndarray:
        """Slanted bright streaks, new ones every frame."""
        rng = np.random.default_rng((self.scene.detail_seed, f))
        count = max(8, self.width * self.height // 60)
        length = max(3, round(0.1 * self.height))
        x0 = rng.uniform(0, self.width, count)
        y0 = rng.uniform(-length, self.height, count)
        steps = np.arange(length)
        ys = (y0[:, None] + steps).astype(int).ravel()
        xs = (x0[:, None] - 0.35 * steps).astype(int).ravel()
        keep = (ys >= 0) & (ys < self.height) & (xs >= 0) & (xs < self.width)
        ys, xs = ys[keep], xs[keep]
        streak = np.float32(0.45 + 0.45 * self.light)
        rgb[ys, xs] += (streak - rgb[ys, xs]) * 0.55
        return rgb

    def _surface(self, colour, z: float) -> np.ndarray:
        """A lit surface: ambient light, plus our headlights on things close ahead at night."""
        light = self.light + (0.6 * min(1.0, 1.6 / z) if self.night else 0.0)
        return np.asarray(colour, np.float32) * light

    def _draw_vehicle(self, canvas: _Canvas, pose: _Pose) -> None:
        scene = self.scene
        x, y, px = self.screen(pose.u, pose.z)
        base = np.asarray(COLOURS[scene.colour], np.float32)
        lamps_on = scene.time != "day"
        # (colour, glows) per lamp; lamps are lights, so they ignore the ambient light when on.
        head = ((1.0, 1.0, 0.85), True) if lamps_on else (0.85 * self._surface((1.0, 1.0, 0.95), pose.z), False)
        tail = ((1.0, 0.08, 0.05), True) if pose.brake else ((0.85, 0.05, 0.04), True) if lamps_on else (
            self._surface((0.55, 0.05, 0.05), pose.z), False)
        lamps = {"lamp_l": head if pose.view == "front" else tail, "lamp_r": head if pose.view != "rear" else tail}
        if pose.indicator:
            lamps[f"lamp_{pose.indicator}"] = ((1.0, 0.62, 0.0), True)
        colours = {
            "body": self._surface(base, pose.z),
            "trim": self._surface(base * 0.55, pose.z),
            "glass": self._surface((0.10, 0.13, 0.18), pose.z),
            "tyre": (0.03, 0.03, 0.03),
        }
        sprite = {"side": _SIDE, "front": _FRONT, "rear": _BACK}[pose.view][scene.vehicle]
        mirror = -1.0 if pose.view == "side" and not pose.facing_right else 1.0  # side sprites face right
        for shape, a, b, c, d, part in sprite:
            colour, glows = lamps.get(part, (colours.get(part), False))
            if shape == _R:
                xa, xb = sorted((x + mirror * a * px, x + mirror * b * px))
                canvas.rect(xa, xb, y - d * px, y - c * px, colour, pose.z)
            else:
                canvas.disc(x + mirror * a * px, y - b * px, c * px, d * px, colour, pose.z)
            if glows:
                radius = (0.12 if lamps[part] is head else 0.07) * px
                canvas.add_glow(x + mirror * (a + b) / 2 * px, y - (c + d) / 2 * px, radius, colour,
                                0.9 if self.night else 0.5)

    def _draw_pedestrian(self, canvas: _Canvas, f: int) -> None:
        start, end = self.scene.extra_event
        p = (f - start) / max(1, end - start)
        z = _PEDESTRIAN_Z
        reach = self.edge_u(z) + 0.3
        u = -reach + 2 * reach * p
        if self.scene.pedestrian_side == "right_to_left":
            u = -u
        x, y, px = self.screen(u, z)
        px *= 1.25  # a little larger than life so the figure reads at 64 pixels
        swing = 0.06 * (1 if f % 2 else -1)
        dark = self._surface((0.15, 0.15, 0.2), z)
        canvas.rect(x + (-0.07 + swing) * px, x + (-0.01 + swing) * px, y - 0.28 * px, y, dark, z)
        canvas.rect(x + (0.01 - swing) * px, x + (0.07 - swing) * px, y - 0.28 * px, y, dark, z)
        canvas.rect(x - 0.10 * px, x + 0.10 * px, y - 0.52 * px, y - 0.26 * px, self._surface(self.clothes, z), z)
        canvas.disc(x, y - 0.59 * px, 0.065 * px, 0.07 * px, self._surface(_SKIN, z), z)

    def _draw_traffic_light(self, canvas: _Canvas, f: int) -> None:
        """A signal hanging over the road, upper right of centre, inside a centre crop."""
        start, switch = self.scene.extra_event
        to_green = self.scene.extra == "light_to_green"
        state = ("red" if to_green else "green") if f < start else "amber" if f < switch else (
            "green" if to_green else "red")
        unit, z = self.unit, 2.5
        left, top = self.cx + 0.16 * unit, 0.03 * self.height
        w, h = 0.10 * unit, 0.30 * unit
        housing = self._surface((0.12, 0.12, 0.12), z) + 0.04
        canvas.rect(left + w / 2, self.width, top + 0.02 * unit, top + 0.045 * unit, housing, z)  # arm
        canvas.rect(left, left + w, top, top + h, housing, z)
        lamps = {"red": (1.0, 0.1, 0.05), "amber": (1.0, 0.65, 0.0), "green": (0.1, 1.0, 0.3)}
        for k, (name, colour) in enumerate(lamps.items()):
            cy = top + h * (k + 0.5) / 3
            on = name == state
            canvas.disc(left + w / 2, cy, 0.036 * unit, 0.036 * unit, colour if on else np.asarray(colour) * 0.18, z)
            if on:
                canvas.add_glow(left + w / 2, cy, 0.05 * unit, colour, 0.8 if self.night else 0.4)


def render_scene(scene: Scene, width: int, height: int) -> np.ndarray:
    """The clip's frames, uint8 [num_frames, height, width, 3] RGB."""
    return _Renderer(scene, width, height).render()


