"""The teacher contract: what a 3D teacher gives for one image pair, and how teachers are found by name.

A teacher turns a batch of loaded pairs (`geod.data_manifests.views.PairData`) into dense predictions at
its own working resolution. Target building (`geod.stage1_extract.targets`) only sees these predictions,
so every teacher yields the same targets format.

Conventions (shared with `geod.pipeline.format_spec`):
- Normalised image coordinates (u, v) in [0, 1]: pixel index (x, y) of a w x h map has its centre at
  u = (x + 0.5) / w, v = (y + 0.5) / h, whatever the map's resolution.
- Camera frames are OpenCV (x right, y down, z forward); "frame A" is view A's camera frame.
- Scene units are the teacher's (`Teacher.scene_units`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from geod.pipeline.errors import TeacherError

if TYPE_CHECKING:
    from geod.data_manifests.views import PairData

SCENE_UNITS = ("metres", "relative")


@dataclass(kw_only=True)
class Matches:
    """Correspondences a teacher found itself (e.g. reciprocal nearest neighbours of descriptors).

    xy_a, xy_b: [N, 2] float32 normalised (u, v) in A and in B; conf: [N] float32 >= 0.
    """

    xy_a: np.ndarray
    xy_b: np.ndarray
    conf: np.ndarray


@dataclass
class CostTopK:
    """Quantised top-k of [P, P] probability rows, as `cost_volume.topk_quantize` defines it: index uint16
    [P, k], prob uint16 [P, k] (floor(p * PROB_SCALE), decreasing), valid bool [P]."""

    index: np.ndarray
    prob: np.ndarray
    valid: np.ndarray


@dataclass(kw_only=True)
class TeacherPrediction:
    """Dense outputs of a teacher for ONE pair, at the teacher's working resolution.

    depth_a, depth_b: [h, w] float32, z in the view's own camera frame, 0 = unknown.
    conf_a, conf_b:   [h, w] float32 >= 0, 0 = unknown.
    points_a: [h_a, w_a, 3] float32, A's points in frame A.
    points_b: [h_b, w_b, 3] float32, B's points expressed in frame A.
    flow_ab:  [h_a, w_a, 2] float32, normalised (u, v) in B of each pixel of A; NaN where A's pixel has
              no valid correspondence (occluded, out of view, unknown depth). flow_ba likewise. Optional.
    matches:  optional `Matches` when the teacher matches itself (preferred over flow_ab when present).
    cost_ab, cost_ba: optional [P, P] float32 probability rows on the dataset's cost-volume grid (row p:
              patch p of the first view over the patches of the second, row-major, see format_spec);
              when absent the target builder derives the cost volume from the flow. A teacher that gives
              them names its grid as config()["cost_grid"] = [grid_h, grid_w], which the runner checks
              against the dataset layout before starting.
    cost_ab_topk, cost_ba_topk: optional `CostTopK` of cost_ab / cost_ba already reduced to the format's
              quantised top-k (a teacher computing it on its device spares the host that work, and may then
              leave cost_ab / cost_ba out); the builder uses it when its k equals the layout's topk, the
              dense rows otherwise.
    A and B may have different resolutions.
    """

    depth_a: np.ndarray
    depth_b: np.ndarray
    conf_a: np.ndarray
    conf_b: np.ndarray
    points_a: np.ndarray
    points_b: np.ndarray
    flow_ab: np.ndarray | None = None
    flow_ba: np.ndarray | None = None
    matches: Matches | None = None
    cost_ab: np.ndarray | None = None
    cost_ba: np.ndarray | None = None
    cost_ab_topk: CostTopK | None = None
    cost_ba_topk: CostTopK | None = None

    def check(self, n_patches: int | None = None) -> None:
        """Raise TeacherError naming the first field whose shape or dtype breaks the contract."""
        for view in ("a", "b"):
            depth = getattr(self, f"depth_{view}")
            _expect(f"depth_{view}", depth, ndim=2)
            hw = depth.shape
            _expect(f"conf_{view}", getattr(self, f"conf_{view}"), shape=hw)
            _expect(f"points_{view}", getattr(self, f"points_{view}"), shape=(*hw, 3))
        if self.flow_ab is not None:
            _expect("flow_ab", self.flow_ab, shape=(*self.depth_a.shape, 2))
        if self.flow_ba is not None:
            _expect("flow_ba", self.flow_ba, shape=(*self.depth_b.shape, 2))
        if self.matches is None and self.flow_ab is None:
            raise TeacherError("teacher prediction has neither matches nor flow_ab")
        if self.matches is not None:
            n = len(self.matches.conf)
            _expect("matches.xy_a", self.matches.xy_a, shape=(n, 2))
            _expect("matches.xy_b", self.matches.xy_b, shape=(n, 2))
            _expect("matches.conf", self.matches.conf, shape=(n,))
        for name, flow in (("cost_ab", self.flow_ab), ("cost_ba", self.flow_ba)):
            cost = getattr(self, name)
            if cost is not None and n_patches is not None:
                _expect(name, cost, shape=(n_patches, n_patches))
            top = getattr(self, f"{name}_topk")
            if cost is None and flow is None and top is None:
                raise TeacherError(f"teacher prediction has neither {name}, {name}_topk nor the flow to derive "
                                   "it from")
            if top is not None:
                rows = n_patches if n_patches is not None else len(top.valid)
                for part, kind, shape in (("valid", "b", (rows,)), ("index", "u", (rows, top.index.shape[-1])),
                                          ("prob", "u", top.index.shape)):
                    _expect(f"{name}_topk.{part}", getattr(top, part), shape=shape, kind=kind)


def _expect(name: str, array: np.ndarray, *, ndim: int | None = None, shape: tuple | None = None,
            kind: str = "f") -> None:
    if not isinstance(array, np.ndarray) or array.dtype.kind != kind:
        what = {"f": "float", "u": "unsigned integer", "b": "bool"}[kind]
        raise TeacherError(f"teacher output {name!r} must be a {what} numpy array, got {type(array).__name__}"
                           f"{'' if not isinstance(array, np.ndarray) else ' of ' + str(array.dtype)}")
    if ndim is not None and array.ndim != ndim:
        raise TeacherError(f"teacher output {name!r} must have {ndim} dimensions, got shape {array.shape}")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise TeacherError(f"teacher output {name!r} must have shape {tuple(shape)}, got {array.shape}")


class Teacher(ABC):
    """A frozen 3D teacher. Subclasses set `name` and `scene_units` ("metres" or "relative")."""

    name: str
    scene_units: str

    @abstractmethod
    def identity(self) -> dict:
        """The weights this teacher runs: {"id": str | None, "sha256": str | None} (None for no weights)."""

    @abstractmethod
    def config(self) -> dict:
        """The resolved options (JSON-serialisable); they change the targets, so they go into the card."""

    @abstractmethod
    def preprocessing(self) -> dict:
        """How the teacher turns source images into its input (resolution, normalisation), for the card."""

    # True when `predict` may be called from several threads at once (the runner then overlaps one batch's
    # host-side work with the next batches' device work); results must not depend on the interleaving.
    concurrent_predict: bool = False

    def prepare(self, pair: PairData) -> PairData:
        """Per-pair input work that needs no model (e.g. resizing to the working resolution). The runner
        calls it in its loader threads, off the thread that drives the model; `predict` must give the
        same result for a prepared and an unprepared pair. Default: `input_preparer()`'s work, if any."""
        preparer = self.input_preparer()
        return pair if preparer is None else preparer(pair)

    def input_preparer(self) -> Callable[[PairData], PairData] | None:
        """`prepare`'s work as a small picklable callable that holds no model, so that loader processes
        can run it next to decoding; None when there is nothing to prepare. Default: None."""
        return None

    @classmethod
    def layout_options(cls, layout) -> dict:
        """Options this teacher takes from the dataset layout (`geod.pipeline.card.DatasetLayout`) unless
        the user gives them, e.g. the grid of the cost volumes it computes. Default: none."""
        return {}

    @abstractmethod
    def predict(self, pairs: list[PairData]) -> list[TeacherPrediction]:
        """Dense predictions for a batch of pairs, one per pair, in order.

        Raises TeacherError when a pair cannot be handled; the caller then retries pair by pair to find
        which one.
        """


# name -> (module, class). Modules are imported on demand: a GPU teacher's torch import must not slow
# down the others.
_TEACHERS = MappingProxyType({
    "geometry": ("geod.stage1_extract.geometry", "GeometryTeacher"),
    "mast3r": ("geod.stage1_extract.mast3r.teacher", "Mast3rTeacher"),
})


def teacher_names() -> tuple[str, ...]:
    """Names `create_teacher` accepts."""
    return tuple(sorted(_TEACHERS))


def create_teacher(name: str, *, layout=None, **options) -> Teacher:
    """Build the teacher registered under `name` with its options (keyword arguments of its class); with a
    dataset `layout`, the options the teacher derives from it (`Teacher.layout_options`) fill in those not
    given."""
    if name not in _TEACHERS:
        raise TeacherError(f"unknown teacher {name!r}; known teachers: {', '.join(teacher_names())}")
    module_name, class_name = _TEACHERS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    if layout is not None:
        options = {**cls.layout_options(layout), **options}
    try:
        return cls(**options)
    except TypeError as error:  # an unknown or missing option
        raise TeacherError(f"teacher {name!r}: bad options {sorted(options)}: {error}") from None
