"""The bundled demo task: a tabletop seen by a wide-angle camera on the gripper, drawn in NumPy.

Two blocks, two of red, green and blue, lie on a 7 x 7 grid of cells; the instruction names one:
  "move the gripper to the {c} block"  bring the gripper down onto it (success on arrival);
  "pick up the {c} block"              go down onto it, close, lift to ``LIFT_Z`` (success when lifted).
Half the episodes (``START_ON_OTHER``) start where a policy that went for the wrong block would be:
above another block, or holding it; without them the nearest block is the named one in most
frames, and the model learned "go to the nearest block" instead of reading the colour.

The camera looks straight down from the gripper (a wrist camera), so the gripper is always at the
image centre and the table moves under it. Its lens is wide-angle (``lens``): the cell under the
gripper fills the central third of the image, a block one cell away lies just outside it, and the
rest of the table is squeezed into the outer thirds, so the whole table is always in view and the
image splits into thirds by direction: a block anywhere to the right of the gripper appears in the
right third. Every cue the task needs is in the pixels:
  * blocks: 15 x 15 px squares in their colour; the table grey on a dark floor;
  * the gripper: a square ring in the central third, thicker the higher it is (2 px at z = 0, 2 px
    more per level), white when open, black when closed; a held block sits inside the ring.
Why this camera and not a fixed one looking at the whole table: with a fixed camera the model must
find both the block and the gripper and compare their positions, and a from-scratch tiny model
learned neither in the minutes a CPU demo has (BENCHMARKS.md, "Why the demo policy failed").

Everything lives on a grid: positions are multiples of ``STEP`` metres, the arm moves each axis by
-1, 0 or +1 steps (the nearest to the commanded delta), and the expert commands exactly +-STEP or 0,
so each action component takes one of three values, a function of the image and the instruction
alone (``image_expert_policy`` reads the state back from pixels and reproduces the expert exactly).

Action (like bridge): float32 [7] = (dx, dy, dz, droll, dpitch, dyaw, gripper), metres per step;
rotations are always 0 for the expert (and ignored by the env); gripper 1 = open, 0 = closed.
Image x grows to the right, y downwards. Proprio ``state``: float32 [4] = (x, y, z, gripper_open).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

DATASET_NAME = "demo_tabletop"
SCENE_VERSION = 4  # bump when rendering or the expert change: stale demo data is then rebuilt
IMAGE_SIZE = 126  # 3 x 42: the demo model sees it at 42 px, one 14-px patch per third
STEP = 0.05  # metres per step on each axis, also the grid spacing
CELLS = 7  # x, y in {-0.15, ..., 0.15}
Z_LEVELS = 4  # z in {0, ..., 0.15}
XY_MAX = STEP * (CELLS - 1) / 2
Z_MAX = STEP * (Z_LEVELS - 1)
LIFT_Z = 2 * STEP
TOL = 0.4 * STEP  # success tolerance per axis; the expert lands exactly on the grid
MAX_STEPS = 30  # the expert needs at most 6 moves + close + 2 lifts
NUM_BLOCKS = 2  # two of the three colours: one named, one to tell it from
START_ON_OTHER = 0.5  # fraction of episodes that start with the gripper above a block not named

# Each colour is the only one above the grey table in one channel, so a linear patch embedding can
# tell them apart (BENCHMARKS.md: with tan-table colours the model learned to find only the blue block).
COLORS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230)}
TASKS = ("move", "pick")
TEMPLATES = {"move": "move the gripper to the {} block", "pick": "pick up the {} block"}

# Pixel geometry: the gripper at the centre C; a point t cells away at C +- lens(|t|), piecewise
# linear through these knots (cells -> pixels): the cell under the gripper fills the central third
# (|t| <= 0.5 -> 21 px), a block one cell away sits clear of it, and the rest of the table, up to 6
# cells, is squeezed into the outer thirds at 6 px per cell.
C = IMAGE_SIZE // 2
LENS_CELLS = (0.0, 0.5, 1.0, 6.0, 7.0)
LENS_PIXELS = (0.0, 21.0, 30.0, 60.0, 63.0)
BLOCK_H = 7  # block half-size: 15 x 15 px (5 x 5 at 42 px); two blocks 2 cells apart overlap <= 3 px
RING_OUT, RING0, RING_PER_LEVEL = 19, 2, 2  # ring: outer half-size, thickness at z = 0 and per level
HELD_H = 9  # half-size of a held block, inside the ring (larger than one on the table)
TABLE, FLOOR = (128, 128, 128), (50, 50, 50)
OPEN, CLOSED = (250, 250, 250), (20, 20, 20)


def instruction_for(task: str, color: str) -> str:
    return TEMPLATES[task].format(color)


def parse_instruction(instruction: str) -> tuple[str, str]:
    """Inverse of ``instruction_for``: (task, colour). Raises ValueError for other text."""
    for task, tmpl in TEMPLATES.items():
        for color in COLORS:
            if instruction.strip().lower() == tmpl.format(color):
                return task, color
    raise ValueError(f"not a demo instruction: {instruction!r}; expected e.g. {TEMPLATES['move']!r}")


def _fill(img: np.ndarray, r0: int, r1: int, c0: int, c1: int, color) -> None:
    """Fill rows r0..r1 and cols c0..c1 inclusive, clipped to the image."""
    h, w = img.shape[:2]
    img[max(r0, 0) : max(min(r1 + 1, h), 0), max(c0, 0) : max(min(c1 + 1, w), 0)] = color


def lens(t) -> np.ndarray:
    """Pixel coordinate of a point `t` cells from the gripper along one axis (float, or an array)."""
    t = np.asarray(t, np.float64)
    return C + np.sign(t) * np.interp(np.abs(t), LENS_CELLS, LENS_PIXELS)


def lens_inverse(u) -> np.ndarray:
    """Cells from the gripper of pixel coordinate `u` (inverse of `lens`)."""
    d = np.asarray(u, np.float64) - C
    return np.sign(d) * np.interp(np.abs(d), LENS_PIXELS, LENS_CELLS)


def ring_thickness(z: float) -> int:
    return int(round(RING0 + RING_PER_LEVEL * z / STEP))


def render(gripper: np.ndarray, gripper_open: bool, blocks: np.ndarray, colors: Sequence[str], held: int) -> np.ndarray:
    """Draw the scene. gripper: [3] xyz metres; blocks: [K, 2] xy metres. Returns uint8 [126,126,3]."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = FLOOR
    gx, gy = gripper[0] / STEP, gripper[1] / STEP
    edge = XY_MAX / STEP + 0.5
    (c0, c1), (r0, r1) = [np.round(lens([-edge - g, edge - g])).astype(int) for g in (gx, gy)]
    _fill(img, r0, r1, c0, c1, TABLE)
    for k, (bx, by) in enumerate(blocks):
        if k != held:
            tx, ty = bx / STEP - gx, by / STEP - gy
            c, r = int(np.round(lens(tx))), int(np.round(lens(ty)))
            _fill(img, r - BLOCK_H, r + BLOCK_H, c - BLOCK_H, c + BLOCK_H, COLORS[colors[k]])
    if held >= 0:
        _fill(img, C - HELD_H, C + HELD_H, C - HELD_H, C + HELD_H, COLORS[colors[held]])
    color = OPEN if gripper_open else CLOSED
    for h in range(RING_OUT, RING_OUT - ring_thickness(gripper[2]), -1):
        for lo, hi, left, right in ((-h, -h, -h, h), (h, h, -h, h), (-h, h, -h, -h), (-h, h, h, h)):
            _fill(img, C + lo, C + hi, C + left, C + right, color)
    return img


def expert_action(
    task: str, xyz: np.ndarray, holding_target: bool, target_xy: np.ndarray, holding_other: bool = False
) -> np.ndarray:
    """The scripted expert. Moves each axis by +-STEP toward its goal (0 within STEP/2).

    Returns float32 [7] (dx, dy, dz, 0, 0, 0, gripper).
    """
    a = np.zeros(7, np.float32)
    if holding_other:  # release a wrong block where it is
        a[6] = 1.0
        return a
    if holding_target:
        goal = np.array([xyz[0], xyz[1], LIFT_Z])
        a[6] = 0.0
    else:
        goal = np.array([target_xy[0], target_xy[1], 0.0])
        a[6] = 1.0
    delta = goal - np.asarray(xyz, np.float64)
    move = np.where(np.abs(delta) > STEP / 2, np.sign(delta) * STEP, 0.0)
    a[:3] = move
    if task == "pick" and not holding_target and not move.any():
        a[6] = 0.0  # on the block: close
    return a


class TabletopEnv:
    """The task as an environment. ``reset(seed)`` -> obs; ``step(action)`` -> (obs, r, done, info).

    obs: {"image": uint8 [128,128,3], "state": float32 [4] (x, y, z, open), "instruction": str}.
    info: {"success": bool, "instruction": str, "task": str, "target_color": str, "steps": int}.
    """

    def __init__(self, max_steps: int = MAX_STEPS):
        self.max_steps = max_steps
        self._ready = False

    def reset(self, seed: Any) -> dict:
        """New scene from ``np.random.default_rng(seed)`` (an int or a sequence of ints)."""
        rng = np.random.default_rng(seed)
        self.colors = [str(c) for c in rng.permutation(list(COLORS))[:NUM_BLOCKS]]
        cells: list[tuple[int, ...]] = []
        while len(cells) < NUM_BLOCKS:  # blocks at least 2 cells apart (Chebyshev) never touch
            c = tuple(int(v) for v in rng.integers(0, CELLS, 2))
            if all(max(abs(c[0] - o[0]), abs(c[1] - o[1])) >= 2 for o in cells):
                cells.append(c)
        self.blocks = np.array(cells, np.float64) * STEP - XY_MAX
        g = rng.integers(0, CELLS, 2)
        self.gripper = np.array([g[0] * STEP - XY_MAX, g[1] * STEP - XY_MAX, rng.integers(2, Z_LEVELS) * STEP])
        self.gripper_open = True
        self.held = -1
        self.target = int(rng.integers(NUM_BLOCKS))
        self.task = TASKS[int(rng.integers(len(TASKS)))]
        if rng.random() < START_ON_OTHER:
            # Start where a policy that went for the wrong block ends up: above it (at any height), or,
            # for "pick", holding it. The expert then leaves it (releasing it first) for the named one.
            other = int(rng.choice([k for k in range(NUM_BLOCKS) if k != self.target]))
            self.gripper[:2] = self.blocks[other]
            self.gripper[2] = rng.integers(0, Z_LEVELS) * STEP
            if self.task == "pick" and rng.random() < 0.5:
                self.held, self.gripper_open = other, False
        self.instruction = instruction_for(self.task, self.colors[self.target])
        self.t = 0
        self._ready = True
        return self.observation()

    def observation(self) -> dict:
        state = np.array([*self.gripper, float(self.gripper_open)], np.float32)
        image = render(self.gripper, self.gripper_open, self.blocks, self.colors, self.held)
        return {"image": image, "state": state, "instruction": self.instruction}

    def success(self) -> bool:
        if self.task == "move":
            d = np.abs(self.gripper - [*self.blocks[self.target], 0.0])
            return bool((d <= TOL).all())
        return self.held == self.target and self.gripper[2] >= LIFT_Z - TOL

    def expert(self) -> np.ndarray:
        """The expert's action [7] for the current state."""
        return expert_action(
            self.task,
            self.gripper,
            self.held == self.target,
            self.blocks[self.target],
            holding_other=self.held not in (-1, self.target),
        )

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, dict]:
        if not self._ready:
            raise RuntimeError("call reset(seed) before step()")
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (7,) or not np.isfinite(action).all():
            raise ValueError(f"action must be 7 finite floats, got {action!r}")
        # The arm moves on the grid: each axis by -1, 0 or +1 steps, the nearest to what was asked (a
        # continuous head's 0.047 is one step); rotations have no effect here.
        self.gripper[:3] += np.round(np.clip(action[:3] / STEP, -1.0, 1.0)) * STEP
        self.gripper[:2] = np.clip(self.gripper[:2], -XY_MAX, XY_MAX)
        self.gripper[2] = np.clip(self.gripper[2], 0.0, Z_MAX)
        want_open = bool(action[6] > 0.5)
        if self.gripper_open and not want_open:  # closing: grasp a block under the ring, if any
            d = np.abs(self.blocks - self.gripper[:2]).max(axis=1)
            under = np.nonzero(d <= STEP / 2)[0]
            if under.size and self.gripper[2] <= STEP / 2:
                self.held = int(under[np.argmin(d[under])])
        elif not self.gripper_open and want_open and self.held >= 0:
            self.held = -1  # released where it is, on the table
        self.gripper_open = want_open
        if self.held >= 0:
            self.blocks[self.held] = self.gripper[:2]
        self.t += 1
        success = self.success()
        done = success or self.t >= self.max_steps
        self._ready = not done
        info = {
            "success": success,
            "instruction": self.instruction,
            "task": self.task,
            "target_color": self.colors[self.target],
            "steps": self.t,
        }
        return self.observation(), float(success), done, info


def expert_episode(seed: Any, max_steps: int = MAX_STEPS) -> dict:
    """Roll out the expert; returns an RLDS episode (every frame, incl. the final success frame).

    The final frame's action is what the expert does at the goal (a no-op that holds the gripper).
    """
    env = TabletopEnv(max_steps)
    obs = env.reset(seed)
    frames, actions = [obs], []
    while True:
        a = env.expert()
        actions.append(a)
        obs, _, done, info = env.step(a)
        if done:
            break
        frames.append(obs)
    if not info["success"]:
        raise RuntimeError(f"expert failed on seed {seed!r} ({env.instruction}); this is a bug")
    frames.append(obs)
    actions.append(env.expert())
    t = len(frames)
    last = np.arange(t) == t - 1
    return {
        "steps": {
            "observation": {
                "image": np.stack([f["image"] for f in frames]),
                "state": np.stack([f["state"] for f in frames]),
            },
            "action": np.stack(actions).astype(np.float32),
            "language_instruction": env.instruction,
            "is_first": np.arange(t) == 0,
            "is_last": last,
            "is_terminal": last,
            "reward": last.astype(np.float32),
            "discount": np.ones(t, np.float32),
        },
        "episode_metadata": {"seed": str(seed), "task": env.task, "target_color": env.colors[env.target]},
    }


# ------------------------------------------------------------------------- acting from pixels
def parse_image(image: np.ndarray) -> dict:
    """Read the state back from a rendered image (exact on the grid), relative to the gripper.

    Returns {"z": float, "open": bool, "held": colour or None, "offsets": {colour: [2] xy metres of
    each block on the table relative to the gripper}}. Far offsets are approximate (the lens
    squeezes them into a few pixels), but their sign, all the expert needs, is exact.
    """
    img = np.asarray(image)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"image must be [{IMAGE_SIZE},{IMAGE_SIZE},3], got {img.shape}")
    is_c = lambda color: (img == np.array(color, np.uint8)).all(-1)  # noqa: E731
    is_open = bool(is_c(OPEN)[C - RING_OUT, C])
    ring = is_c(OPEN if is_open else CLOSED)[C - RING_OUT : C, C]  # the top side of the ring, downwards
    thickness = int(np.argmin(ring)) if not ring.all() else RING_OUT
    z = round((thickness - RING0) / RING_PER_LEVEL) * STEP
    held = None
    if not is_open:  # closed around a block of the held size (larger than one on the table below)
        held = next(
            (c for c, rgb in COLORS.items() if (img[C, C] == rgb).all() and (img[C + HELD_H, C] == rgb).all()), None
        )
    offsets = {}
    for color, rgb in COLORS.items():
        if color == held:
            continue
        r, c = np.nonzero(is_c(rgb))
        if r.size:  # a neighbour may hide a few columns of a block: take the middle of what is seen
            t = lens_inverse(np.array([(c.min() + c.max()) / 2, (r.min() + r.max()) / 2]))
            offsets[color] = np.where(np.abs(t) < 0.5, 0.0, np.round(t)) * STEP
    return {"z": z, "open": is_open, "held": held, "offsets": offsets}


def image_expert_policy(images: np.ndarray, instructions: Sequence[str]) -> np.ndarray:
    """The expert acting from pixels and text only: uint8 [B,128,128,3], B str -> float32 [B,7].

    It shows the task is solvable from what the model sees, and is the reference policy for
    closed-loop evaluation.
    """
    out = np.zeros((len(instructions), 7), np.float32)
    for i, (img, text) in enumerate(zip(images, instructions)):
        task, color = parse_instruction(text)
        s = parse_image(img)
        target = s["offsets"].get(color, np.zeros(2))
        out[i] = expert_action(
            task, np.array([0.0, 0.0, s["z"]]), s["held"] == color, target, holding_other=s["held"] not in (None, color)
        )
    return out


def random_policy(seed: int = 0) -> Callable[..., np.ndarray]:
    """Uniform random actions in the action range: the chance baseline."""
    rng = np.random.default_rng(seed)

    def policy(images: np.ndarray, instructions: Sequence[str], proprio=None) -> np.ndarray:
        b = len(instructions)
        a = rng.uniform(-STEP, STEP, (b, 7)).astype(np.float32)
        a[:, 3:6] = 0.0
        a[:, 6] = rng.integers(0, 2, b)
        return a

    return policy
