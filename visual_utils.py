"""Figures of scans, candidates and models (slices, 3D surfaces, training curves, Grad-CAM).

    python visual_utils.py gradcam --model-path work/classification/resnet/fold0/best.keras \\
        --cache-dir work/cache --candidates work/submission.csv --out gradcam.png [--top 6]
    python visual_utils.py gradcam --model-path work/classification/resnet50_2d/fold0/best.keras \\
        --cache-dir work/cache --candidates work/submission.csv --out gradcam_2d.png
    python visual_utils.py montage --cache-dir work/cache --seriesuid UID --out montage.png \\
        [--candidates work/submission.csv] [--slices 12]

Figures (each returns a ``matplotlib.figure.Figure``; ``save_figure`` writes it as PNG):

* ``slice_montage``: axial slices of a scan with nodule / candidate circles;
* ``three_plane_view``: axial, coronal and sagittal slices through a point, mark drawn;
* ``surface_figure``: 3D surface of the lung mask (marching cubes) with the nodules;
* ``training_curves_figure``: loss and metrics of ``history.csv`` files;
* ``gradcam_figure``: Grad-CAM maps (``grad_cams``) over a cube's three central slices,
  optionally with a 2D member's rows under them;
* ``gradcam_views_figure``: a 2D member's Grad-CAM (``grad_cams_2d``, through its nested
  backbone) on a candidate's axial, coronal and sagittal views.

Slices are shown in the radiological orientation whatever the scan's direction matrix
(patient right on the left, anterior up in axial slices, superior up in coronal and
sagittal ones), so a flipped-z scan looks like any other (meant for axis-aligned direction
matrices, flips included, as in LUNA16). Every mark is placed with ``ct_io.world_to_voxel``
and drawn with its true cross-section radius in the slice.
Figures use matplotlib's object API with the Agg canvas: no pyplot, no global state.

The run report that puts these figures together is ``report.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import cache
import config as config_lib
from ct_io import Geometry, ScanError, check_seriesuid, voxel_to_world, world_to_voxel
from evaluate import DEFAULT_DIAMETER_MM
from tables import WORLD_COLUMNS, InputError, atomic_open, check_output_path

PLANES = ("axial", "coronal", "sagittal")
# (row axis, column axis, normal axis) as array axes (0 = z, 1 = y, 2 = x) of each plane.
PLANE_AXES = {"axial": (1, 2, 0), "coronal": (0, 2, 1), "sagittal": (0, 1, 2)}
# World direction (0 = x, 1 = y, 2 = z; sign) that rows and columns run along on screen
# in the radiological convention of LPS coordinates: columns towards the patient's left
# (+x) in axial and coronal slices, towards posterior (+y) in sagittal ones; rows towards
# posterior (+y) in axial slices, towards inferior (-z) in coronal and sagittal ones.
SCREEN_DIRECTIONS = {"axial": ((1, 1), (0, 1)), "coronal": ((2, -1), (0, 1)),
                     "sagittal": ((2, -1), (1, 1))}
NODULE_COLOR = "lime"
EXCLUDED_COLOR = "gold"
MARK_COLOR = "red"
CANDIDATE_COLOR = "orange"


# --------------------------------------------------------------------------- figures


def new_figure(width_in: float, height_in: float):
    """A Figure on its own Agg canvas (leaves pyplot and the global backend alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path, dpi: int = 90) -> Path:
    """Write ``figure`` as PNG atomically (a reader never sees half a file); returns the path."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return path


def message_figure(text: str, title: str = "", width_in: float = 8.0, height_in: float = 2.5):
    """A figure holding only ``text``: stands in for a figure that has nothing to show."""
    figure = new_figure(width_in, height_in)
    ax = figure.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11)
    if title:
        ax.set_title(title)
    return figure


def _value_range(image: np.ndarray, value_range):
    if value_range is not None:
        return value_range
    if image.dtype == np.uint8:
        return 0, 255
    finite = image[np.isfinite(image)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


# --------------------------------------------------------------------------- planes


@dataclass(frozen=True, eq=False)
class PlaneView:
    """One slice of a volume, oriented for the screen, and how voxels map into it.

    ``image[row, col]``; ``locate`` gives where any voxel point falls on it and how far
    (mm) it lies from the slice plane.
    """

    name: str
    image: np.ndarray
    row_axis: int  # array axis (0 = z, 1 = y, 2 = x) running down the rows
    col_axis: int
    normal_axis: int
    slice_vox: int  # index of the slice along normal_axis in the full volume
    start_vox: tuple[int, int, int]  # full-volume voxel of the image's first row/col
    flip_rows: bool
    flip_cols: bool
    pixel_mm: tuple[float, float]  # (row, col) pixel size
    normal_mm: float  # voxel size along the normal

    def locate(self, points_zyx_vox):
        """``(rows, cols, offsets_mm)`` of voxel points ``(n, 3)`` (z, y, x) on the image."""
        p = np.atleast_2d(np.asarray(points_zyx_vox, dtype=np.float64))
        rows = p[:, self.row_axis] - self.start_vox[self.row_axis]
        cols = p[:, self.col_axis] - self.start_vox[self.col_axis]
        if self.flip_rows:
            rows = self.image.shape[0] - 1 - rows
        if self.flip_cols:
            cols = self.image.shape[1] - 1 - cols
        offsets = (p[:, self.normal_axis] - self.slice_vox) * self.normal_mm
        return rows, cols, offsets

    @property
    def aspect(self) -> float:
        return self.pixel_mm[0] / self.pixel_mm[1]


def _screen_flips(geometry: Geometry, plane: str) -> tuple[bool, bool]:
    """Whether rows / columns of the raw array slice run against the screen convention."""
    matrix = geometry.direction_matrix
    flips = []
    for array_axis, (world_axis, sign) in zip(PLANE_AXES[plane][:2], SCREEN_DIRECTIONS[plane]):
        # Column a of the direction matrix is the world direction of index axis a (x, y, z);
        # array axis v is index axis 2 - v.
        component = matrix[world_axis, 2 - array_axis]
        flips.append(bool(component * sign < 0))
    return flips[0], flips[1]


def plane_view(volume: np.ndarray, geometry: Geometry, plane: str, center_zyx_vox,
               window_vox: int | None = None, pad_value=0) -> PlaneView:
    """The ``plane`` slice through voxel ``center_zyx_vox`` (rounded half up; clamped into
    the volume), whole or a ``window_vox`` square around the centre (padded with
    ``pad_value`` outside the volume). Reads only that slice of a memory-mapped volume."""
    from generators import crop_patch

    if plane not in PLANE_AXES:
        raise ValueError(f"plane {plane!r} must be one of {', '.join(PLANES)}")
    row_axis, col_axis, normal_axis = PLANE_AXES[plane]
    shape = np.asarray(volume.shape[:3], dtype=np.int64)
    center = np.floor(np.asarray(center_zyx_vox, dtype=np.float64) + 0.5).astype(np.int64)
    center[normal_axis] = np.clip(center[normal_axis], 0, shape[normal_axis] - 1)
    size = shape.copy()
    start = np.zeros(3, dtype=np.int64)
    size[normal_axis] = 1
    start[normal_axis] = center[normal_axis]
    if window_vox is not None:
        for axis in (row_axis, col_axis):
            size[axis] = int(window_vox)
            start[axis] = center[axis] - int(window_vox) // 2
    box = crop_patch(volume, start + size // 2, size, pad_value)
    image = np.squeeze(box, axis=normal_axis)  # remaining axes keep their order: rows, cols
    flip_rows, flip_cols = _screen_flips(geometry, plane)
    if flip_rows:
        image = image[::-1]
    if flip_cols:
        image = image[:, ::-1]
    spacing = geometry.spacing_zyx_mm
    return PlaneView(plane, np.ascontiguousarray(image), row_axis, col_axis, normal_axis,
                     int(center[normal_axis]), tuple(int(v) for v in start), flip_rows,
                     flip_cols, (float(spacing[row_axis]), float(spacing[col_axis])),
                     float(spacing[normal_axis]))


def plane_views(volume: np.ndarray, geometry: Geometry, point_xyz_mm,
                window_vox: int | None = 64, pad_value=0) -> list[PlaneView]:
    """Axial, coronal and sagittal views through a world point (x, y, z mm)."""
    center = world_to_voxel(np.asarray(point_xyz_mm, dtype=np.float64), geometry)
    return [plane_view(volume, geometry, plane, center, window_vox, pad_value) for plane in PLANES]


def _show(ax, view: PlaneView, value_range=None, cmap: str = "gray"):
    vmin, vmax = _value_range(view.image, value_range)
    ax.imshow(view.image, cmap=cmap, vmin=vmin, vmax=vmax, aspect=view.aspect,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_circles(ax, view: PlaneView, points_zyx_vox, diameters_mm, *, color: str,
                 linestyle: str = "-", linewidth: float = 1.2) -> int:
    """Circle each sphere where it cuts the slice (radius of the cross-section, so a
    nodule shrinks on the slices near its edge and vanishes beyond it); returns how
    many were drawn."""
    from matplotlib.patches import Ellipse

    points = np.atleast_2d(np.asarray(points_zyx_vox, dtype=np.float64))
    if len(points) == 0:
        return 0
    diameters = np.broadcast_to(np.asarray(diameters_mm, dtype=np.float64), (len(points),))
    rows, cols, offsets = view.locate(points)
    drawn = 0
    height, width = view.image.shape
    for row, col, offset, diameter in zip(rows, cols, offsets, diameters):
        radius = (diameter if diameter > 0 else DEFAULT_DIAMETER_MM) / 2.0
        if abs(offset) >= radius:
            continue
        cut = math.sqrt(radius * radius - offset * offset)
        # Skip circles wholly outside the image; matplotlib would still widen the axes.
        if col + cut / view.pixel_mm[1] < -0.5 or col - cut / view.pixel_mm[1] > width - 0.5 \
                or row + cut / view.pixel_mm[0] < -0.5 or row - cut / view.pixel_mm[0] > height - 0.5:
            continue
        ax.add_patch(Ellipse((col, row), 2 * cut / view.pixel_mm[1], 2 * cut / view.pixel_mm[0],
                             fill=False, edgecolor=color, linestyle=linestyle, linewidth=linewidth))
        drawn += 1
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    return drawn


def draw_cross(ax, view: PlaneView, point_zyx_vox, *, color: str = MARK_COLOR,
               gap: float | None = None, length: float | None = None):
    """Crosshair on the point: four ticks around it with a gap in the middle, so the
    structure under the mark stays visible. Drawn whatever the point's distance to the
    slice (it marks the centre of the view). ``gap``, ``length`` in image pixels (default
    a fraction of the image). Returns the Line2D (its ticks are symmetric about the point)."""
    rows, cols, _ = view.locate(point_zyx_vox)
    row, col = float(rows[0]), float(cols[0])
    side = min(view.image.shape)
    gap = max(2.0, 0.06 * side) if gap is None else gap
    length = max(2.0, 0.1 * side) if length is None else length
    nan = np.nan
    xs = [col - gap - length, col - gap, nan, col + gap, col + gap + length, nan,
          col, col, nan, col, col]
    # Ticks along rows are divided by the pixel aspect so all four look equally long.
    ys = [row, row, nan, row, row, nan,
          row - (gap + length) / view.aspect, row - gap / view.aspect, nan,
          row + gap / view.aspect, row + (gap + length) / view.aspect]
    (line,) = ax.plot(xs, ys, "-", color=color, linewidth=1.6, gid="mark")
    return line


def _table_voxels(frame: pd.DataFrame | None, geometry: Geometry):
    """Voxel points (n, 3) and diameters (n,) of a table's rows (diameter 0 where absent)."""
    if frame is None or len(frame) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    points = world_to_voxel(frame[WORLD_COLUMNS].to_numpy(np.float64), geometry)
    diameters = (frame["diameter_mm"].to_numpy(np.float64) if "diameter_mm" in frame
                 else np.zeros(len(frame)))
    return points.reshape(-1, 3), diameters


def three_plane_view(volume: np.ndarray, geometry: Geometry, point_xyz_mm, *,
                     diameter_mm: float | None = None, nodules: pd.DataFrame | None = None,
                     excluded: pd.DataFrame | None = None, window_vox: int | None = 64,
                     pad_value=0, title: str | None = None, axes=None, value_range=None):
    """Axial, coronal and sagittal slices through a world point with a red crosshair on it.

    Args:
        volume: ``(z, y, x)`` array (e.g. ``cache.open_scan(...).volume``).
        geometry: its ``ct_io.Geometry``.
        point_xyz_mm: the point (x, y, z mm).
        diameter_mm: also circle the point in red with this diameter.
        nodules, excluded: tables (``coordX, coordY, coordZ, diameter_mm``) of spheres to
            circle in green / yellow where they cut the slices.
        window_vox: side of the square shown around the point; None for whole slices.
        pad_value: value outside the volume.
        title: figure title (or, with ``axes``, the axial panel's title).
        axes: three Axes to draw into (e.g. one row of a grid); default a new figure.

    Returns:
        The Figure.
    """
    views = plane_views(volume, geometry, point_xyz_mm, window_vox, pad_value)
    if axes is None:
        figure = new_figure(9.0, 3.4)
        axes = [figure.add_subplot(1, 3, i + 1) for i in range(3)]
        if title:
            figure.suptitle(title, fontsize=10)
        title = None
    figure = axes[0].figure
    center = world_to_voxel(np.asarray(point_xyz_mm, dtype=np.float64), geometry)
    nodule_points, nodule_diameters = _table_voxels(nodules, geometry)
    excluded_points, excluded_diameters = _table_voxels(excluded, geometry)
    for ax, view in zip(axes, views):
        _show(ax, view, value_range)
        draw_circles(ax, view, excluded_points, excluded_diameters, color=EXCLUDED_COLOR,
                     linestyle=":")
        draw_circles(ax, view, nodule_points, nodule_diameters, color=NODULE_COLOR)
        if diameter_mm:
            draw_circles(ax, view, center, diameter_mm, color=MARK_COLOR, linestyle="--")
        draw_cross(ax, view, center)
        ax.set_xlabel(view.name, fontsize=8)
    if title:
        axes[0].set_title(title, fontsize=9, loc="left")
    return figure


# --------------------------------------------------------------------------- montage


def montage_slices(volume_shape, geometry: Geometry, nodules: pd.DataFrame | None = None,
                   n_slices: int = 12) -> list[int]:
    """Axial slice indices for a montage: every nodule's centre slice first (at most
    ``n_slices``), the rest spread evenly over the volume; sorted."""
    n_z = int(volume_shape[0])
    chosen: list[int] = []
    points, _ = _table_voxels(nodules, geometry)
    for z in np.floor(points[:, 0] + 0.5).astype(int) if len(points) else []:
        if 0 <= z < n_z and z not in chosen and len(chosen) < n_slices:
            chosen.append(int(z))
    for z in np.linspace(0, n_z - 1, n_slices + 2)[1:-1].round().astype(int):
        if len(chosen) >= n_slices:
            break
        if int(z) not in chosen:
            chosen.append(int(z))
    return sorted(chosen)


def slice_montage(volume: np.ndarray, geometry: Geometry, nodules: pd.DataFrame | None = None,
                  candidates: pd.DataFrame | None = None, *, mask: np.ndarray | None = None,
                  slices=None, n_slices: int = 12, columns: int = 4,
                  candidate_diameter_mm: float = 6.0, title: str | None = None,
                  value_range=None):
    """Axial slices of a scan with the nodules (green circles of their cross-section),
    candidates (orange dashed circles of ``candidate_diameter_mm``) and optionally the
    lung mask outline (cyan).

    ``slices``: axial indices to show (default ``montage_slices``). Returns the Figure.
    """
    if slices is None:
        slices = montage_slices(volume.shape, geometry, nodules, n_slices)
    slices = [int(s) for s in slices]
    if not slices:
        raise ValueError("no slice to show")
    rows = math.ceil(len(slices) / columns)
    figure = new_figure(3.0 * columns, 3.1 * rows + (0.4 if title else 0.0))
    nodule_points, nodule_diameters = _table_voxels(nodules, geometry)
    cand_points, _ = _table_voxels(candidates, geometry)
    for i, z in enumerate(slices):
        ax = figure.add_subplot(rows, columns, i + 1)
        center = (z, volume.shape[1] / 2.0, volume.shape[2] / 2.0)
        view = plane_view(volume, geometry, "axial", center)
        _show(ax, view, value_range)
        if mask is not None:
            outline = plane_view(mask, geometry, "axial", center).image
            if outline.any():
                ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.5)
        n_cand = draw_circles(ax, view, cand_points, candidate_diameter_mm, color=CANDIDATE_COLOR,
                              linestyle="--", linewidth=0.9)
        n_nod = draw_circles(ax, view, nodule_points, nodule_diameters, color=NODULE_COLOR)
        world_z = voxel_to_world(np.asarray(center, dtype=np.float64), geometry)[2]
        ax.set_title(f"z={z} ({world_z:.1f} mm) nod {n_nod} cand {n_cand}", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------- surface


def surface_mesh(mask: np.ndarray, geometry: Geometry, step: int = 2, level: float = 0.5):
    """Marching-cubes surface of a binary mask, on every ``step``-th voxel.

    Returns ``(vertices (n, 3) world x, y, z mm, faces (m, 3) vertex indices)``; empty
    arrays for an empty mask.
    """
    from skimage.measure import marching_cubes

    if step < 1:
        raise ValueError(f"step={step} must be >= 1")
    small = np.asarray(mask[::step, ::step, ::step]) > 0
    if not small.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    # A zero border closes the surface where the mask touches the volume's edge.
    padded = np.pad(small.astype(np.float32), 1)
    vertices, faces, _, _ = marching_cubes(padded, level)
    vertices_vox = (vertices - 1.0) * step  # back to full-volume voxel indices (z, y, x)
    return voxel_to_world(vertices_vox, geometry), faces.astype(np.int64)


def sphere_mesh(center_xyz_mm, diameter_mm: float, resolution: int = 12):
    """Quadrilaterals ``(n, 4, 3)`` (world mm) of a sphere, for a Poly3DCollection."""
    radius = (diameter_mm if diameter_mm > 0 else DEFAULT_DIAMETER_MM) / 2.0
    u = np.linspace(0.0, 2.0 * np.pi, resolution + 1)
    v = np.linspace(0.0, np.pi, resolution // 2 + 1)
    grid = np.stack([np.outer(np.cos(u), np.sin(v)), np.outer(np.sin(u), np.sin(v)),
                     np.outer(np.ones_like(u), np.cos(v))], axis=-1) * radius
    grid = grid + np.asarray(center_xyz_mm, dtype=np.float64)
    quads = np.stack([grid[:-1, :-1], grid[1:, :-1], grid[1:, 1:], grid[:-1, 1:]], axis=2)
    return quads.reshape(-1, 4, 3)


def surface_figure(mask: np.ndarray, geometry: Geometry, nodules: pd.DataFrame | None = None,
                   *, step: int | None = None, title: str | None = None,
                   elevation: float = 10.0, azimuth: float = -90.0):
    """3D view of the lung mask's surface (translucent) and the nodules (red spheres of
    their diameter) in world coordinates; seen from the front (anterior) by default.

    ``step``: mask subsampling for marching cubes (default: about 64 voxels along the
    longest axis). Returns the Figure.
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    if step is None:
        step = max(1, math.ceil(max(mask.shape) / 64))
    vertices, faces = surface_mesh(mask, geometry, step)
    figure = new_figure(7.0, 7.0)
    ax = figure.add_subplot(1, 1, 1, projection="3d")
    if len(faces):
        ax.add_collection3d(Poly3DCollection(vertices[faces], facecolor="steelblue",
                                             edgecolor="none", alpha=0.15))
        low, high = vertices.min(axis=0), vertices.max(axis=0)
    else:
        corners = voxel_to_world(np.array([[0, 0, 0], np.asarray(mask.shape) - 1], float), geometry)
        low, high = corners.min(axis=0), corners.max(axis=0)
    n_nodules = 0
    if nodules is not None:
        for row in nodules.itertuples(index=False):
            ax.add_collection3d(Poly3DCollection(
                sphere_mesh((row.coordX, row.coordY, row.coordZ), float(row.diameter_mm)),
                facecolor="red", edgecolor="none", alpha=0.9))
            n_nodules += 1
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_zlim(low[2], high[2])
    ax.set_box_aspect(np.maximum(high - low, 1e-6))
    ax.set_xlabel("x mm")
    ax.set_ylabel("y mm")
    ax.set_zlabel("z mm")
    ax.view_init(elev=elevation, azim=azimuth)
    ax.set_title(title or f"lungs and {n_nodules} nodule(s)", fontsize=9)
    return figure


# --------------------------------------------------------------------------- training curves


def read_history(path) -> pd.DataFrame:
    """A ``history.csv`` (``training.RunFolder``) with an ``epoch`` column."""
    path = Path(path)
    frame = pd.read_csv(path)
    if frame.empty:
        raise ValueError(f"{path}: history has no epochs")
    if "epoch" not in frame:
        frame.insert(0, "epoch", np.arange(len(frame)))
    if "loss" not in frame:
        raise ValueError(f"{path}: history has no loss column (found {', '.join(frame.columns)})")
    return frame


def metric_families(columns) -> list[str]:
    """Metric names of a history (``auc`` for ``auc``/``val_auc``), loss and lr left out."""
    names = []
    for column in columns:
        base = column.removeprefix("val_")
        if base not in ("epoch", "loss", "lr", "learning_rate") and base not in names:
            names.append(base)
    return names


def training_curves_figure(histories: dict):
    """Loss (left) and metrics (right, train solid, validation dashed) per model.

    ``histories``: label -> ``history.csv`` path or DataFrame. Returns the Figure.
    """
    if not histories:
        raise ValueError("no history to plot")
    figure = new_figure(12.0, 3.2 * len(histories))
    colors = [f"C{i}" for i in range(10)]
    for r, (label, history) in enumerate(histories.items()):
        frame = history if isinstance(history, pd.DataFrame) else read_history(history)
        epochs = frame["epoch"].to_numpy()
        ax = figure.add_subplot(len(histories), 2, 2 * r + 1)
        for column, style in (("loss", "-o"), ("val_loss", "--s")):
            if column in frame:
                _plot_series(ax, epochs, frame[column], style, "C0" if column == "loss" else "C3",
                             column)
        ax.set_title(f"{label}: loss", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax = figure.add_subplot(len(histories), 2, 2 * r + 2)
        families = metric_families(frame.columns)
        for k, name in enumerate(families):
            color = colors[k % len(colors)]
            for column, style in ((name, "-o"), (f"val_{name}", "--s")):
                if column in frame:
                    _plot_series(ax, epochs, frame[column], style, color, column)
        ax.set_title(f"{label}: metrics", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        if families:
            ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _plot_series(ax, epochs, values, style, color, label):
    values = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    keep = np.isfinite(values)  # some metrics are computed only every few epochs
    if keep.any():
        ax.plot(epochs[keep], values[keep], style, color=color, label=label, markersize=3)


# --------------------------------------------------------------------------- Grad-CAM


def _last_layer_of_rank(layers, rank: int, skip=()) -> str | None:
    """Name of the last of ``layers`` whose output has ``rank`` dimensions (batch
    included), input layers and ``skip`` types left out; None where there is none."""
    import keras

    for layer in reversed(list(layers)):
        if isinstance(layer, (keras.layers.InputLayer, *skip)):
            continue
        try:
            if len(layer.output.shape) == rank:
                return layer.name
        except (AttributeError, ValueError):
            continue  # a layer used several times has no single output
    return None


def find_gradcam_layer(model) -> str:
    """Name of the last layer with a 5D output (batch, z, y, x, channels) before the first
    global pooling / flatten layer: the last 3D feature map the prediction is read from."""
    import keras

    pooling = (keras.layers.GlobalAveragePooling3D, keras.layers.GlobalMaxPooling3D,
               keras.layers.Flatten)
    layers = list(model.layers)
    stop = next((i for i, layer in enumerate(layers) if isinstance(layer, pooling)), len(layers))
    name = _last_layer_of_rank(layers[:stop], 5)
    if name is not None:
        return name
    raise ValueError(f"model {model.name} has no 3D feature map (5D layer output) before its "
                     "global pooling: Grad-CAM needs a 3D convolutional classifier")


def grad_cams(model, cubes, layer_name: str | None = None):
    """Grad-CAM of a 3D classifier's output probability.

    Gradients of the probability w.r.t. the feature map of ``layer_name`` (default
    ``find_gradcam_layer``), averaged over space, weight the map's channels; the ReLU of
    the weighted sum is upsampled to the cube (``scipy.ndimage.zoom``, linear) and divided
    by its maximum.

    Args:
        model: a keras classifier ``(n, c, c, c, 1) -> (n, 1)``.
        cubes: ``(n, c, c, c)`` or ``(n, c, c, c, 1)`` float inputs as the model saw them
            in training (``generators.to_unit`` of the cache's uint8); uint8 is converted.

    Returns:
        ``(cams float32 (n, c, c, c) in [0, 1], probabilities float64 (n,))``; a cam is all
        zero where no region raises the probability.
    """
    import keras
    import tensorflow as tf
    from scipy import ndimage

    x = np.asarray(cubes)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    x = x.astype(np.float32)
    if x.ndim == 4:
        x = x[..., None]
    if x.ndim != 5:
        raise ValueError(f"cubes of shape {x.shape}: expected (n, z, y, x) or (n, z, y, x, 1)")
    name = layer_name or find_gradcam_layer(model)
    probe = keras.Model(model.inputs, [model.get_layer(name).output, model.outputs[0]])
    inputs = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        features, probability = probe(inputs, training=False)
        # Samples are independent in inference mode, so the gradient of the sum gives
        # each sample's own gradient.
        score = tf.reduce_sum(tf.cast(probability, tf.float32))
    grads = tape.gradient(score, features)
    if grads is None:
        raise ValueError(f"the output does not depend on layer {name}")
    features = tf.cast(features, tf.float32).numpy()
    grads = tf.cast(grads, tf.float32).numpy()
    weights = grads.mean(axis=(1, 2, 3))  # (n, channels)
    maps = np.maximum(np.einsum("nzyxc,nc->nzyx", features, weights), 0.0)
    target = x.shape[1:4]
    cams = np.zeros((len(x), *target), dtype=np.float32)
    for i, cam in enumerate(maps):
        factors = [t / s for t, s in zip(target, cam.shape)]
        # grid_mode: each feature-map cell covers a block of the input, edges to edges.
        up = ndimage.zoom(cam, factors, order=1, grid_mode=True, mode="nearest")
        up = _fit_shape(np.maximum(up, 0.0), target)
        peak = float(up.max())
        cams[i] = up / peak if peak > 0 else 0.0
    return cams, np.asarray(probability, dtype=np.float64).reshape(-1)


def grad_cam(model, cube, layer_name: str | None = None):
    """``grad_cams`` of one cube ``(c, c, c)``: ``(cam (c, c, c), probability)``."""
    cams, probabilities = grad_cams(model, np.asarray(cube)[None], layer_name)
    return cams[0], float(probabilities[0])


# --------------------------------------------------------------------------- Grad-CAM of 2D members


@dataclass(frozen=True)
class ViewCams:
    """A 2D member's Grad-CAM of some candidates, ready to draw: per candidate its axial,
    coronal and sagittal images ``(n, 3, S, S)`` in [0, 1], the maps on them and a title."""

    images: np.ndarray
    heats: np.ndarray
    titles: list


def _view_model_parts(model):
    """``(view_features, backbone, view_fusion, head)`` of a ``models.transfer2d`` model."""
    from models import transfer2d

    backbone = transfer2d.backbone_of(model)
    view_features = transfer2d.view_features_of(model)
    return view_features, backbone, model.get_layer("view_fusion"), model.get_layer("head")


def _chain(model) -> list:
    """The layers of a chain-shaped functional ``model``, in order, without its input."""
    import keras

    return [item for item in model.layers if not isinstance(item, keras.layers.InputLayer)]


def _layers_before(model, layer) -> list:
    chain = _chain(model)
    return chain[:chain.index(layer)]


def _layers_after(model, layer) -> list:
    chain = _chain(model)
    return chain[chain.index(layer) + 1:]


def find_gradcam_layer_2d(backbone) -> str:
    """Name of the backbone's last convolutional feature map: its last layer with a 4D
    output ``(batch, rows, cols, channels)`` that is not a pooling layer (VGG: the last
    convolution rather than the pooling after it, ResNet: ``conv5_block3_out``)."""
    import keras

    pooling = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
    name = _last_layer_of_rank(backbone.layers, 4, skip=pooling)
    if name is not None:
        return name
    raise ValueError(f"backbone {backbone.name} has no 2D feature map (4D layer output): "
                     "Grad-CAM needs a convolutional backbone (a ViT has none)")


def grad_cams_2d(model, views, layer_name: str | None = None, class_index: int = 0):
    """Grad-CAM of a 2D member (``models.transfer2d``) on its backbone's last convolutional
    feature map (Selvaraju et al. 2017, "Grad-CAM").

    The backbone is a model nested inside the member, so the feature map of one of its
    layers is not a tensor of the member's graph (Keras 3: ``model.get_layer(backbone)
    .output`` belongs to the backbone's own graph). The member is therefore run in parts:
    the layers before the backbone (its preprocessing), a probe from the backbone's input
    to ``[feature map, backbone output]``, then the layers after the backbone (pooling, the
    views' fusion, the head); the gradient of the probability w.r.t. the probe's feature
    map is then defined.

    Args:
        model: a 2D member ``(n, [views,] S, S, 3) -> (n, 1)``, or a ``train_images.py``
            model ``(n, S, S, 3) -> (n, classes)`` (built alike by ``transfer2d.assemble``).
        views: its inputs (``views2d``: float in [0, 1]).
        layer_name: a 4D layer of the backbone (default ``find_gradcam_layer_2d``).
        class_index: the output whose probability is explained.

    Returns:
        ``(cams float32 (n, [views,] S, S) in [0, 1], probabilities float64 (n,))``; a
        candidate's maps are divided by their common maximum (all zero where no region
        raises the probability).
    """
    import keras
    import tensorflow as tf

    x = np.asarray(views, dtype=np.float32)
    if x.ndim != len(model.input_shape) or tuple(x.shape[1:]) != tuple(model.input_shape[1:]):
        raise ValueError(f"views of shape {x.shape}: the model takes {model.input_shape}")
    view_features, backbone, fusion, head = _view_model_parts(model)
    name = layer_name or find_gradcam_layer_2d(backbone)
    probe = keras.Model(backbone.inputs, [backbone.get_layer(name).output, backbone.outputs[0]])
    images = tf.convert_to_tensor(x.reshape((-1, *x.shape[-3:])))
    with tf.GradientTape() as tape:
        for layer in _layers_before(view_features, backbone):
            images = layer(images)
        features, pooled = probe(images, training=False)
        for layer in _layers_after(view_features, backbone):
            pooled = layer(pooled)
        if x.ndim == 5:  # multiview: the shared backbone saw every view; fuse as the member
            pooled = tf.reshape(pooled, (x.shape[0], x.shape[1], -1))
            for layer in _layers_after(fusion, fusion.get_layer("per_view")):
                pooled = layer(pooled)
        probability = head(pooled, training=False)[:, class_index]
        # Samples are independent in inference mode: the gradient of the sum gives each
        # sample's own gradient.
        score = tf.reduce_sum(tf.cast(probability, tf.float32))
    grads = tape.gradient(score, features)
    if grads is None:
        raise ValueError(f"the output does not depend on backbone layer {name}")
    maps = _weighted_maps(tf.cast(features, tf.float32).numpy(),
                          tf.cast(grads, tf.float32).numpy(), x.shape[-3:-1])
    cams = _normalise_per_candidate(maps.reshape((*x.shape[:-3], *maps.shape[1:])))
    return cams, np.asarray(probability, dtype=np.float64).reshape(-1)


def _weighted_maps(features: np.ndarray, grads: np.ndarray, size) -> np.ndarray:
    """ReLU of the feature maps ``(m, h, w, c)`` weighted by their space-averaged
    gradients, upsampled to ``size`` (linear, edges to edges): ``(m, *size)``."""
    from scipy import ndimage

    weights = grads.mean(axis=(1, 2))
    maps = np.maximum(np.einsum("nhwc,nc->nhw", features, weights), 0.0)
    target = tuple(int(v) for v in size)
    out = np.zeros((len(maps), *target), dtype=np.float32)
    for i, cam in enumerate(maps):
        factors = [t / s for t, s in zip(target, cam.shape)]
        up = ndimage.zoom(cam, factors, order=1, grid_mode=True, mode="nearest")
        out[i] = _fit_shape(np.maximum(up, 0.0), target)
    return out


def _normalise_per_candidate(cams: np.ndarray) -> np.ndarray:
    """Each candidate's maps (first axis) divided by their common maximum (0 stays 0)."""
    peaks = cams.reshape(len(cams), -1).max(axis=1, initial=0.0)
    scale = np.where(peaks > 0, peaks, np.inf).reshape((-1,) + (1,) * (cams.ndim - 1))
    return (cams / scale).astype(np.float32)


def orthogonal_views(views: np.ndarray, cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The axial, coronal and sagittal images of each candidate's views and the Grad-CAM
    on them: ``(images (n, 3, S, S), heats (n, 3, S, S))``. ``tri`` views hold the three
    planes as channels (one map over all three); ``multiview`` holds them as its first
    three views (``views2d.PLANES``), each shown by its centre channel."""
    views, cams = np.asarray(views), np.asarray(cams)
    if views.ndim == 4:  # tri: (n, S, S, 3)
        return np.moveaxis(views, -1, 1), np.repeat(cams[:, None], 3, axis=1)
    return views[:, :3, :, :, 1], cams[:, :3]


def view_cams_of(model, views, titles, layer_name: str | None = None) -> tuple[ViewCams, np.ndarray]:
    """``grad_cams_2d`` of ``views`` ready for ``gradcam_figure``: ``(ViewCams, probabilities)``;
    ``titles(probabilities)`` gives the rows' titles."""
    cams, probabilities = grad_cams_2d(model, views, layer_name)
    images, heats = orthogonal_views(views, cams)
    return ViewCams(images, heats, list(titles(probabilities))), probabilities


def _fit_shape(array: np.ndarray, shape) -> np.ndarray:
    """Crop / edge-pad to ``shape`` (zoom's rounding can be one voxel off)."""
    out = array[tuple(slice(0, s) for s in shape)]
    pad = [(0, s - o) for s, o in zip(shape, out.shape)]
    return np.pad(out, pad, mode="edge") if any(p[1] for p in pad) else out


def gradcam_figure(cubes, cams, titles=None, geometries=None, alpha: float = 0.4,
                   view_cams: "ViewCams | None" = None):
    """Each cube's three central slices (axial, coronal, sagittal) with its Grad-CAM in
    'jet' on top and a red crosshair at the centre (the candidate). ``geometries`` (one
    ``Geometry`` for all cubes or one per cube: spacing and direction of the scan a cube
    comes from) orient the slices like ``plane_view``; without them they are raw array
    slices. ``view_cams`` (a 2D member's Grad-CAM of the same candidates, ``view_cams_of``)
    adds a row of its three orthogonal views under each cube's row. Returns the Figure."""
    cubes = np.asarray(cubes)
    if cubes.ndim == 5:
        cubes = cubes[..., 0]
    cams = np.asarray(cams)
    if cubes.shape != cams.shape:
        raise ValueError(f"cubes {cubes.shape} and cams {cams.shape} differ in shape")
    if view_cams is not None and len(view_cams.images) != len(cubes):
        raise ValueError(f"{len(view_cams.images)} candidates' views for {len(cubes)} cubes")
    if geometries is None:
        geometries = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if isinstance(geometries, Geometry):
        geometries = [geometries] * len(cubes)
    per_cube = 1 if view_cams is None else 2
    rows = per_cube * len(cubes)
    figure = new_figure(9.0, 3.1 * max(rows, 1))
    for i, (cube, cam, geometry) in enumerate(zip(cubes, cams, geometries)):
        _cube_cam_row(figure, rows, per_cube * i, cube, cam, geometry,
                      None if titles is None else titles[i], alpha)
        if view_cams is not None:
            _view_cam_row(figure, rows, per_cube * i + 1, view_cams.images[i],
                          view_cams.heats[i], view_cams.titles[i], alpha)
    figure.tight_layout()
    return figure


def gradcam_views_figure(view_cams: "ViewCams", alpha: float = 0.4):
    """A 2D member's Grad-CAM alone: one row of three orthogonal views per candidate."""
    figure = new_figure(9.0, 3.1 * max(len(view_cams.images), 1))
    for i, (images, heats) in enumerate(zip(view_cams.images, view_cams.heats)):
        _view_cam_row(figure, len(view_cams.images), i, images, heats, view_cams.titles[i],
                      alpha)
    figure.tight_layout()
    return figure


def _cube_cam_row(figure, rows: int, row: int, cube, cam, geometry, title, alpha: float):
    """Row ``row`` of ``rows``: a cube's three central slices with its Grad-CAM."""
    center = np.asarray(cube.shape) // 2  # where crop_patch put the candidate
    for j, plane in enumerate(PLANES):
        ax = figure.add_subplot(rows, 3, 3 * row + j + 1)
        view = plane_view(cube, geometry, plane, center)
        heat = plane_view(cam, geometry, plane, center)
        _show(ax, view, (0, 255) if cube.dtype == np.uint8 else (0.0, 1.0))
        ax.imshow(heat.image, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0,
                  aspect=view.aspect, interpolation="bilinear")
        draw_cross(ax, view, center)
        ax.set_xlabel(plane, fontsize=8)
        if j == 0 and title is not None:
            ax.set_title(title, fontsize=8, loc="left")


def _view_cam_row(figure, rows: int, row: int, images, heats, title, alpha: float):
    """Row ``row`` of ``rows``: a candidate's axial, coronal and sagittal views (already in
    the screen orientation, ``views2d``) with a 2D member's Grad-CAM on each."""
    for j, plane in enumerate(PLANES):
        ax = figure.add_subplot(rows, 3, 3 * row + j + 1)
        image = np.asarray(images[j])
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(heats[j], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
        center = image.shape[0] // 2  # views2d puts the candidate on pixel (S // 2, S // 2)
        ax.plot([center], [center], "+", color=MARK_COLOR, markersize=12, markeredgewidth=1.2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{plane} view", fontsize=8)
        if j == 0 and title is not None:
            ax.set_title(title, fontsize=8, loc="left")


def candidate_cubes(cache_dir, table: pd.DataFrame, cube_size: int) -> np.ndarray:
    """uint8 cubes ``(n, c, c, c)`` around the rows' world points (cache padding value
    outside the scan), in table order."""
    import generators

    metas = cache.load_scan_metas(cache_dir)
    cubes = np.zeros((len(table), cube_size, cube_size, cube_size), dtype=np.uint8)
    for i, row in enumerate(table.itertuples(index=False)):
        if row.seriesuid not in metas:
            raise ValueError(f"scan {row.seriesuid} is not in the cache {cache_dir}")
        scan = cache.open_scan(cache_dir, row.seriesuid)
        center = world_to_voxel(np.array([row.coordX, row.coordY, row.coordZ]), scan.geometry)
        cubes[i] = generators.crop_patch(scan.volume, center, cube_size,
                                         generators.cache_pad_value(cache_dir, scan.meta))
    return cubes


def with_diameter_column(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """``frame`` with a (NaN) ``diameter_mm`` column where it has none (a cached table of
    a data set without diameters)."""
    if frame is not None and "diameter_mm" not in frame:
        frame = frame.assign(diameter_mm=pd.Series(dtype=np.float64))
    return frame


# --------------------------------------------------------------------------- command line


def _read_marks(path, top: int, seriesuids=None) -> pd.DataFrame:
    from tables import read_table

    frame = read_table(path, ["seriesuid", *WORLD_COLUMNS], kind="candidates")
    if seriesuids:
        frame = frame[frame["seriesuid"].isin(seriesuids)]
    if "probability" in frame:
        frame = frame.sort_values("probability", ascending=False, kind="stable")
    frame = frame.head(top).reset_index(drop=True)
    if len(frame) == 0:
        raise ValueError(f"{path}: no candidate row to show")
    return frame


def gradcam_command(args) -> None:
    """``gradcam``: Grad-CAM of a classifier on the top rows of a candidate table."""
    import predict

    check_output_path(args.out, [args.candidates, args.model_path], kind="figure")
    if args.save_maps:
        check_output_path(args.save_maps, [args.candidates, args.model_path], kind="maps")
    marks = _read_marks(args.candidates, args.top, args.seriesuids)
    model = _load_any_classifier(args.model_path)
    if predict.is_view_model(model):
        _gradcam_views_command(args, marks, model)
        return
    cubes = candidate_cubes(args.cache_dir, marks, int(model.input_shape[1]))
    cams, probabilities = grad_cams(model, cubes.astype(np.float32) / np.float32(255.0),
                                    args.layer)
    titles = [f"...{r.seriesuid[-8:]} ({r.coordX:.1f}, {r.coordY:.1f}, {r.coordZ:.1f}) "
              f"p={p:.3f}" for r, p in zip(marks.itertuples(index=False), probabilities)]
    geometries = [cache.open_scan(args.cache_dir, u).geometry for u in marks["seriesuid"]]
    save_figure(gradcam_figure(cubes, cams, titles, geometries), args.out)
    if args.save_maps:
        with atomic_open(args.save_maps, "wb") as handle:
            np.savez_compressed(handle, cubes=cubes, cams=cams, probabilities=probabilities)


def _load_any_classifier(path):
    """A 3D classifier or a 2D member (``predict.load_classifier`` /
    ``predict.load_view_classifier``); the 3D loader's error where neither fits."""
    import predict

    try:
        return predict.load_classifier(path)
    except InputError as err:
        try:
            return predict.load_view_classifier(path)
        except (InputError, ValueError):
            raise err from None


def _gradcam_views_command(args, marks: pd.DataFrame, model) -> None:
    """``gradcam`` of a 2D member: its views (the settings of its training run) with the
    Grad-CAM of its backbone's last convolutional feature map."""
    import predict
    import views2d

    settings = predict.view_settings_of(model, args.model_path, config_lib.Config())
    views = np.concatenate([batch for batch, _ in views2d.view_batches(args.cache_dir, marks,
                                                                        settings)])
    cams, probabilities = grad_cams_2d(model, views, args.layer)
    titles = [f"...{r.seriesuid[-8:]} ({r.coordX:.1f}, {r.coordY:.1f}, {r.coordZ:.1f}) p={p:.3f}"
              for r, p in zip(marks.itertuples(index=False), probabilities)]
    save_figure(gradcam_views_figure(ViewCams(*orthogonal_views(views, cams), titles)), args.out)
    if args.save_maps:
        with atomic_open(args.save_maps, "wb") as handle:
            np.savez_compressed(handle, views=views, cams=cams, probabilities=probabilities)


def montage_command(args) -> None:
    """``montage``: axial slices of one cached scan with its nodules and marks."""
    from tables import read_table

    check_output_path(args.out, [args.candidates], kind="figure")
    uid = check_seriesuid(args.seriesuid, "--seriesuid")
    scan = cache.open_scan(args.cache_dir, uid)
    annotations = with_diameter_column(cache.load_table(args.cache_dir, "annotations"))
    nodules = annotations[annotations["seriesuid"] == uid]
    marks = None
    if args.candidates:
        marks = read_table(args.candidates, ["seriesuid", *WORLD_COLUMNS], kind="candidates")
        marks = marks[marks["seriesuid"] == uid]
        if "probability" in marks:
            marks = marks[marks["probability"] >= args.min_probability]
    figure = slice_montage(scan.volume, scan.geometry, nodules, marks, mask=scan.mask,
                           n_slices=args.slices, title=f"scan {uid}")
    save_figure(figure, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cam = commands.add_parser("gradcam", help="Grad-CAM of a classifier on candidate cubes "
                                              "(of a 2D member, on its views)")
    cam.add_argument("--model-path", required=True, help="a .keras classifier or 2D member")
    cam.add_argument("--cache-dir", required=True, help="preprocess.py output")
    cam.add_argument("--candidates", required=True,
                     help="CSV seriesuid,coordX,coordY,coordZ[,probability]; highest first")
    cam.add_argument("--out", required=True, help="PNG to write")
    cam.add_argument("--top", type=int, default=6, help="rows shown")
    cam.add_argument("--seriesuids", nargs="+", help="only these scans")
    cam.add_argument("--layer", help="feature-map layer (default: the last 3D one; of a 2D "
                                     "member, its backbone's last convolutional one)")
    cam.add_argument("--save-maps", help="also write cubes and maps to this .npz")
    mon = commands.add_parser("montage", help="axial slice montage of a cached scan")
    mon.add_argument("--cache-dir", required=True)
    mon.add_argument("--seriesuid", required=True)
    mon.add_argument("--out", required=True, help="PNG to write")
    mon.add_argument("--candidates", help="CSV of marks to circle (e.g. a submission)")
    mon.add_argument("--min-probability", type=float, default=0.0,
                     help="circle only candidates at or above this probability")
    mon.add_argument("--slices", type=int, default=12, help="number of slices")
    return parser


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args = _parser().parse_args(argv)
    command = gradcam_command if args.command == "gradcam" else montage_command
    try:
        command(args)
    except (FileNotFoundError, ValueError, InputError, ScanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
