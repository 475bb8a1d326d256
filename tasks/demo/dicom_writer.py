"""Writing a patient's series as CT Image Storage files (compressed where the plan says so)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from data_schemas.files import atomic_write_bytes
from tasks.demo.patients import PatientPlan, synth_uid
from tasks.demo.render import hu_to_stored, render_patient_hu


def _dicom_slice(plan: PatientPlan, slice_index: int, stored: np.ndarray) -> Dataset:
    """A CT Image Storage dataset for one slice (compressed when the plan says so)."""
    sop_uid = synth_uid(plan.seed, plan.identifiers.patient_id, "instance", slice_index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    _set_patient_and_study(ds, plan, slice_index)
    _set_acquisition(ds, plan)
    _set_position(ds, plan, slice_index)
    _set_pixels(ds, plan, stored)
    if plan.transfer_syntax != ExplicitVRLittleEndian:
        # compress() would otherwise draw a fresh random SOP Instance UID and break determinism.
        ds.compress(UID(plan.transfer_syntax), stored, generate_instance_uid=False)
    return ds


def _set_patient_and_study(ds: Dataset, plan: PatientPlan, slice_index: int) -> None:
    """Patient, study and series identity, dates and descriptions (the identifiers a real export carries)."""
    ids = plan.identifiers
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = plan.study_date
    ds.StudyTime = plan.study_time
    ds.SeriesTime = ds.AcquisitionTime = plan.study_time
    ds.ContentTime = f"{plan.study_time}.{slice_index:06d}"
    ds.AccessionNumber = ids.accession_number
    ds.Modality = "CT"
    ds.InstitutionName = ids.institution_name
    ds.ReferringPhysicianName = ids.referring_physician_name
    ds.StationName = ids.station_name
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
    ds.SeriesDescription = f"AXIAL {plan.slice_thickness_mm:g}mm {plan.scanner.convolution_kernel}"
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = ids.patient_birth_date
    ds.PatientSex = plan.patient_sex
    ds.PatientAge = plan.patient_age
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = ids.study_instance_uid
    ds.SeriesInstanceUID = ids.series_instance_uid
    ds.StudyID = ids.study_id
    ds.SeriesNumber = plan.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = slice_index + 1


def _set_acquisition(ds: Dataset, plan: PatientPlan) -> None:
    """The scanner and how it acquired and reconstructed the series."""
    scanner = plan.scanner
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model_name
    ds.SliceThickness = f"{plan.slice_thickness_mm:g}"
    ds.KVP = f"{scanner.kvp:g}"
    ds.SpacingBetweenSlices = f"{plan.slice_thickness_mm:g}"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{plan.matrix * plan.pixel_spacing_mm:.1f}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.XRayTubeCurrent = 180 + 20 * plan.scanner_index
    ds.ConvolutionKernel = scanner.convolution_kernel
    ds.PatientPosition = "HFS"


def _set_position(ds: Dataset, plan: PatientPlan, slice_index: int) -> None:
    """Where the slice lies in the patient frame (LPS): position, orientation, frame of reference."""
    geometry_z = plan.z_start_mm - slice_index * plan.slice_thickness_mm
    first_pixel = -(plan.matrix - 1) / 2 * plan.pixel_spacing_mm
    ds.ImagePositionPatient = [f"{first_pixel:.4f}", f"{first_pixel:.4f}", f"{geometry_z:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = plan.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{geometry_z:.2f}"


def _set_pixels(ds: Dataset, plan: PatientPlan, stored: np.ndarray) -> None:
    """The image pixel module, the stored-value-to-HU mapping and the display windows."""
    scanner = plan.scanner
    spacing = plan.pixel_spacing_mm
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = plan.matrix
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = scanner.bits_stored
    ds.HighBit = scanner.bits_stored - 1
    ds.PixelRepresentation = scanner.pixel_representation
    if scanner.outside_fov_hu is not None:
        ds.PixelPaddingValue = int(scanner.outside_fov_hu - scanner.rescale_intercept)
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.RescaleIntercept = f"{scanner.rescale_intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = stored.tobytes()


def write_patient_series(plan: PatientPlan, dicom_dir: Path) -> list[Path]:
    """Render and write one patient's series; returns the written paths."""
    series_dir = plan.series_dir(dicom_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for j, hu in enumerate(render_patient_hu(plan)):
        ds = _dicom_slice(plan, j, hu_to_stored(hu, plan.scanner))
        path = series_dir / plan.file_name(j)
        _write_dataset_atomically(ds, path)
        paths.append(path)
    return paths


def _write_dataset_atomically(ds: Dataset, path: Path) -> None:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())
