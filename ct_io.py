"""Reading CT scans with SimpleITK, and the one pair of world <-> voxel conversions.

Conventions used across the project:

* numpy arrays of volumes are always ``(z, y, x)``;
* CSVs and world points are ``x, y, z`` in millimetres (LUNA16 ``coordX, coordY, coordZ``);
* ``Geometry`` describes how voxel indices map to the world, exactly as SimpleITK does:
  ``world_xyz = origin_xyz + D @ (index_xyz * spacing_xyz)`` with ``D`` the 3x3 direction
  matrix (row-major, as ``sitk.Image.GetDirection()`` returns it). A scan with a flipped z
  axis has ``D[2, 2] == -1``; ignoring ``D`` is the classic LUNA16 coordinate bug.

``world_to_voxel`` and ``voxel_to_world`` are the only functions that convert between the
two; every stage calls them.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Files SimpleITK reads as single volumes; anything else in a folder may be a DICOM slice.
VOLUME_SUFFIXES = (".mhd", ".nii.gz", ".nii", ".nrrd")
# Files that are never DICOM, so folders holding only these are not probed for series.
NON_DICOM_SUFFIXES = VOLUME_SUFFIXES + (
    ".raw", ".zraw", ".csv", ".txt", ".md", ".json", ".png", ".jpg", ".jpeg", ".npy", ".npz",
    ".gz", ".zip", ".py", ".pdf", ".xml",
)
# Voxel sizes outside this range are not a chest CT (or a broken header).
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
MIN_SLICES = 8


class ScanError(Exception):
    """A scan that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Geometry:
    """Placement of a voxel grid in the world (mm), as SimpleITK defines it."""

    origin_xyz_mm: tuple[float, float, float]
    spacing_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Geometry":
        return cls(
            origin_xyz_mm=tuple(float(v) for v in image.GetOrigin()),
            spacing_xyz_mm=tuple(float(v) for v in image.GetSpacing()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        return tuple(reversed(self.spacing_xyz_mm))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry on ``image`` (in place) and return it."""
        image.SetOrigin(self.origin_xyz_mm)
        image.SetSpacing(self.spacing_xyz_mm)
        image.SetDirection(self.direction)
        return image

    def shifted(self, offset_zyx_vox) -> "Geometry":
        """Geometry of a crop whose first voxel is ``offset_zyx_vox`` of this grid."""
        origin = voxel_to_world(np.asarray(offset_zyx_vox, dtype=np.float64), self)
        return Geometry(tuple(float(v) for v in origin), self.spacing_xyz_mm, self.direction)


def world_to_voxel(points_xyz_mm, geometry: Geometry) -> np.ndarray:
    """World points ``(..., 3)`` as x, y, z mm -> continuous voxel indices ``(..., 3)`` as z, y, x."""
    points = np.asarray(points_xyz_mm, dtype=np.float64)
    origin = np.asarray(geometry.origin_xyz_mm, dtype=np.float64)
    spacing = np.asarray(geometry.spacing_xyz_mm, dtype=np.float64)
    # Solve D @ (index * spacing) = point - origin; D is orthonormal for CT but solve anyway.
    scaled = np.linalg.solve(geometry.direction_matrix, (points - origin).reshape(-1, 3).T).T
    index_xyz = scaled / spacing
    return index_xyz[:, ::-1].reshape(points.shape)


def voxel_to_world(points_zyx_vox, geometry: Geometry) -> np.ndarray:
    """Continuous voxel indices ``(..., 3)`` as z, y, x -> world points ``(..., 3)`` as x, y, z mm."""
    points = np.asarray(points_zyx_vox, dtype=np.float64)
    index_xyz = points.reshape(-1, 3)[:, ::-1]
    spacing = np.asarray(geometry.spacing_xyz_mm, dtype=np.float64)
    origin = np.asarray(geometry.origin_xyz_mm, dtype=np.float64)
    world = origin + (geometry.direction_matrix @ (index_xyz * spacing).T).T
    return world.reshape(points.shape)


@dataclass(frozen=True)
class ScanSource:
    """Where one scan lives: a volume file, or a DICOM series inside a folder."""

    seriesuid: str
    path: str
    dicom_files: tuple[str, ...] = ()

    @property
    def is_dicom(self) -> bool:
        return bool(self.dicom_files)


def check_seriesuid(seriesuid: str, where: str = "") -> str:
    """Reject ids that would escape the cache folder when used as a file name."""
    text = str(seriesuid).strip()
    bad = (not text or text in (".", "..") or "/" in text or "\\" in text or ".." in text
           or "\x00" in text)
    if bad:
        at = f" in {where}" if where else ""
        raise ScanError(
            f"seriesuid {seriesuid!r}{at} is not usable as a file name "
            "(empty, or contains a path separator or '..'); rename the scan."
        )
    return text


def _volume_stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_scans(data_dir) -> tuple[list[ScanSource], list[tuple[str, str]]]:
    """Find every scan under ``data_dir``.

    Returns ``(sources, problems)``: sources sorted by seriesuid; problems as
    ``(path, reason)`` for things that look like scans but cannot be listed (unreadable
    DICOM folders, duplicate seriesuids).
    """
    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {root} is not a folder")
    sources: dict[str, ScanSource] = {}
    problems: list[tuple[str, str]] = []

    def add(source: ScanSource):
        try:
            # Stripped, as the tables' seriesuids are: a file named " 1.2.3.mhd" is scan
            # 1.2.3, so the annotations of 1.2.3 find it.
            source = replace(source, seriesuid=check_seriesuid(source.seriesuid, source.path))
        except ScanError as err:
            problems.append((source.path, str(err)))
            return
        if source.seriesuid in sources:
            problems.append((source.path, f"duplicate seriesuid {source.seriesuid} "
                                          f"(also {sources[source.seriesuid].path}); skipped"))
            return
        sources[source.seriesuid] = source

    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        maybe_dicom = False
        for name in sorted(filenames):
            lower = name.lower()
            path = Path(folder) / name
            if lower.endswith(VOLUME_SUFFIXES):
                add(ScanSource(_volume_stem(path), str(path)))
            elif not lower.endswith(NON_DICOM_SUFFIXES) and not name.startswith("."):
                maybe_dicom = True
        if maybe_dicom:
            for source in _dicom_series_in(Path(folder), problems):
                add(source)
    return [sources[k] for k in sorted(sources)], problems


def _dicom_series_in(folder: Path, problems) -> list[ScanSource]:
    # GDCM groups the files by SeriesInstanceUID, so several series in one folder are
    # separate scans, each named by its own uid.
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    except RuntimeError as err:
        problems.append((str(folder), f"cannot list DICOM series: {err}"))
        return []
    found = []
    for uid in series_ids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        if files:
            found.append(ScanSource(uid, str(folder), tuple(files)))
    if not series_ids and any(p.suffix.lower() == ".dcm" for p in folder.iterdir()):
        problems.append((str(folder), "holds .dcm files but no readable DICOM series"))
    return found


def read_image(source: ScanSource) -> sitk.Image:
    """Read a scan as a SimpleITK image, checked to be a usable 3D grey-value CT.

    Raises ``ScanError`` naming the file when it is missing, truncated or larger than its
    header says, not 3D, has an absurd voxel size, or (a DICOM series) has missing or
    unevenly spaced slices.
    """
    path = source.path
    try:
        if source.is_dicom:
            image = _read_dicom_series(source)
        else:
            if path.lower().endswith(".mhd"):
                _check_mhd_data_file(Path(path))
            image = sitk.ReadImage(path)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        raise ScanError(f"{path}: cannot be read ({lines[-1] if lines else 'unknown error'})") from None
    if image.GetDimension() != 3:
        raise ScanError(f"{path}: is {image.GetDimension()}D, a CT scan must be 3D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per "
                        "voxel, expected a grey-value CT")
    check_geometry(Geometry.from_image(image), image.GetSize()[::-1], path)
    return image


def _read_dicom_series(source: ScanSource) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(source.dicom_files))
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the position check
    image = reader.Execute()
    positions = _slice_positions_mm(reader, len(source.dicom_files))
    if positions is not None:
        check_slice_positions(positions, source.path)
    return image


def _slice_positions_mm(reader: sitk.ImageSeriesReader, n_slices: int) -> np.ndarray | None:
    """Each slice's ImagePositionPatient (0020,0032) projected on the slice normal (the
    cross product of the ImageOrientationPatient (0020,0037) row and column directions,
    DICOM PS3.3 C.7.6.2.1.1), in mm; None when the tags are missing."""
    position_tag, orientation_tag = "0020|0032", "0020|0037"
    if n_slices < 2 or not all(reader.HasMetaDataKey(i, position_tag) for i in range(n_slices)) \
            or not reader.HasMetaDataKey(0, orientation_tag):
        return None
    try:
        orientation = [float(v) for v in reader.GetMetaData(0, orientation_tag).split("\\")]
        positions = np.array([[float(v) for v in reader.GetMetaData(i, position_tag).split("\\")]
                              for i in range(n_slices)])
    except ValueError:
        return None
    if len(orientation) != 6 or positions.shape[1] != 3:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        return None  # not two orthonormal directions: no normal to measure along
    return positions @ normal


def check_slice_positions(positions_mm, path: str) -> None:
    """Raise ``ScanError`` when the slices of a series are not evenly spaced: a missing
    slice, two slices at one position, or steps that differ by more than 1% (at least
    0.01 mm). SimpleITK would only warn and stack the slices at their average spacing,
    which puts every slice past the gap at the wrong place."""
    positions = np.sort(np.asarray(positions_mm, dtype=np.float64))
    if len(positions) < 3:
        return
    steps = np.diff(positions)
    step = float(np.median(steps))
    tolerance = max(0.01 * step, 0.01)
    if step <= tolerance:
        raise ScanError(f"{path}: most slices share a position along the slice normal; "
                        "not one series of slices")
    for k in np.flatnonzero(np.abs(steps - step) > tolerance):
        low, high = positions[k], positions[k + 1]
        missing = round((high - low) / step) - 1
        where = f"between the slices at {low:.2f} and {high:.2f} mm along the slice normal"
        if missing >= 1 and abs(high - low - (missing + 1) * step) <= tolerance:
            lost = ", ".join(f"{low + j * step:.2f}" for j in range(1, missing + 1))
            what = (f"slice position {lost} mm is missing" if missing == 1 else
                    f"{missing} slices are missing, at positions {lost} mm")
            raise ScanError(f"{path}: {what} ({where}; the other slices are {step:g} mm "
                            "apart)")
        if high - low <= tolerance:
            raise ScanError(f"{path}: two slices at position {low:.2f} mm along the slice "
                            "normal (a duplicate slice, or two series mixed)")
        raise ScanError(f"{path}: uneven slice spacing: {high - low:.3f} mm {where}, the "
                        f"other slices are {step:g} mm apart")


def check_geometry(geometry: Geometry, shape_zyx, path: str) -> None:
    """Raise ``ScanError`` for zero, absurd or non-finite voxel sizes and tiny volumes."""
    spacing = np.asarray(geometry.spacing_xyz_mm)
    if not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM) \
            or np.any(spacing > MAX_SPACING_MM):
        raise ScanError(
            f"{path}: voxel spacing {tuple(spacing.round(4))} mm is outside "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm; the header is broken")
    if not np.all(np.isfinite(geometry.origin_xyz_mm)):
        raise ScanError(f"{path}: origin {geometry.origin_xyz_mm} is not finite")
    if min(shape_zyx) < MIN_SLICES:
        raise ScanError(f"{path}: shape (z, y, x) {tuple(shape_zyx)} is too small for a CT "
                        f"(fewer than {MIN_SLICES} voxels along an axis)")


# Bytes per voxel of the MetaImage element types (ITK's MetaIO).
MET_ELEMENT_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2,
                     "MET_UINT": 4, "MET_INT": 4, "MET_FLOAT": 4, "MET_DOUBLE": 8,
                     "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8}


def _read_mhd_header(mhd_path: Path) -> dict[str, str]:
    header = {}
    try:
        for line in mhd_path.read_text(errors="replace").splitlines():
            if "=" in line:
                key, value = line.split("=", 1)
                header[key.strip()] = value.strip()
    except OSError as err:
        raise ScanError(f"{mhd_path}: cannot be read ({err})") from None
    return header


def _check_mhd_data_file(mhd_path: Path) -> None:
    """The ``.raw`` holds exactly what the header describes. ITK reads a data file larger
    than ``DimSize`` says without complaint (a wrong DimSize shears or cuts the image) and
    fills a ``CompressedData`` file that is not zlib data with zeros; its message for a
    missing or short file is cryptic. Here each names the file and the sizes."""
    header = _read_mhd_header(mhd_path)
    data_file = header.get("ElementDataFile")
    if data_file is None:
        raise ScanError(f"{mhd_path}: header has no ElementDataFile")
    if data_file == "LOCAL" or data_file.startswith("LIST") or "%" in data_file:
        return
    raw = mhd_path.parent / data_file
    if not raw.exists():
        raise ScanError(f"{mhd_path}: its data file {raw} is missing")
    if header.get("CompressedData", "False").lower() == "true":
        _check_zlib_stream(mhd_path, raw)  # the inflated size is only known after inflating
        return
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        n_channels = int(header.get("ElementNumberOfChannels", "1"))
        header_bytes = int(header.get("HeaderSize", "0"))
    except (KeyError, ValueError):
        raise ScanError(f"{mhd_path}: header has no valid DimSize") from None
    element = MET_ELEMENT_BYTES.get(header.get("ElementType", ""))
    if element is None:
        return
    expected = int(np.prod(dims)) * element * n_channels
    actual = raw.stat().st_size
    described = (f"DimSize {' '.join(map(str, dims))} x {element} bytes"
                 + (f" x {n_channels} channels" if n_channels != 1 else ""))
    if header_bytes == -1:  # MetaIO: the data are the last bytes of the file
        header_bytes = max(actual - expected, 0)
    if actual < expected + header_bytes:
        raise ScanError(f"{mhd_path}: data file {raw} is truncated ({actual} bytes, header "
                        f"needs {expected + header_bytes}: {described})")
    if actual > expected + header_bytes:
        raise ScanError(f"{mhd_path}: data file {raw} has {actual} bytes, more than the "
                        f"header describes ({expected + header_bytes}: {described}); "
                        "the header does not match its data")


def _check_zlib_stream(mhd_path: Path, raw: Path) -> None:
    try:
        with open(raw, "rb") as handle:
            zlib.decompressobj().decompress(handle.read(1 << 16), 1 << 16)
    except zlib.error as err:
        raise ScanError(f"{mhd_path}: header says CompressedData = True but {raw} is not "
                        f"zlib-compressed data ({err}); corrupt data or a wrong header") from None
    except OSError as err:
        raise ScanError(f"{mhd_path}: its data file {raw} cannot be read ({err})") from None
