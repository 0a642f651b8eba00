"""Write a volume as a DICOM CT series (one file per slice), like the TCIA Pancreas-CT scans.

pydicom is used because ITK's series writer needs hand-made per-slice geometry tags anyway.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ..atomic import atomic_write

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def write_dicom_series(
    volume: np.ndarray, affine_ras: np.ndarray, folder: Path, patient_id: str, seed: int
) -> None:
    """Write ``volume`` (array axes: column, row, slice) with its RAS affine as an axial series.

    The folder is written under a temporary name and renamed, so a series is complete or absent.
    """

    def write(tmp: Path) -> None:
        tmp.mkdir()
        _write_slices(volume, affine_ras, tmp, patient_id, seed)

    atomic_write(folder, write)


def _write_slices(volume: np.ndarray, affine_ras: np.ndarray, tmp: Path, patient_id: str, seed: int) -> None:
    lps = _RAS_TO_LPS @ affine_ras[:3, :4]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    row_dir, col_dir, slice_dir = (lps[:, i] / spacing[i] for i in range(3))
    study, series, frame = (
        generate_uid(entropy_srcs=[patient_id, str(seed), k]) for k in ("study", "series", "frame")
    )
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid(entropy_srcs=[patient_id, str(seed), str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", patient_id, patient_id
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        position = lps[:, 3] + slice_dir * spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows, between columns
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(tmp / f"1-{k + 1:03d}.dcm", enforce_file_format=True)
