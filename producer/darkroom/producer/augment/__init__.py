"""Bulk dataset augmentation: every source image × prompts × strengths × seeds (× adapters), as img2img jobs.

    from darkroom.producer import Client
    from darkroom.producer.augment import Augmentation, AugmentSpec

    with Client.from_env() as client:
        run = Augmentation(client, AugmentSpec.build({...}))
        run.run(window=256)          # resumable: the same spec skips what succeeded, resubmits what failed
        run.export("dataset/")       # an imagefolder dataset: images + metadata.jsonl

The CLI is ``darkroom augment`` (:mod:`darkroom.producer.cli_augment`). Nothing here imports torch or numpy;
pyarrow is imported only to read or write Parquet.
"""

from .dataset import COLUMNS, DatasetFiles, export, read_metadata
from .grid import Cell, cell_id, expand
from .plan import Estimate, Plan
from .run import DEFAULT_WINDOW, Augmentation, RunReport, SpecConflict, spec_uri
from .sources import Source, list_sources
from .spec import AugmentSpec, load_spec_file, parse_adapter_set, parse_seeds
from .submitter import Progress

__all__ = [
    "COLUMNS",
    "DEFAULT_WINDOW",
    "AugmentSpec",
    "Augmentation",
    "Cell",
    "DatasetFiles",
    "Estimate",
    "Plan",
    "Progress",
    "RunReport",
    "Source",
    "SpecConflict",
    "cell_id",
    "expand",
    "export",
    "list_sources",
    "load_spec_file",
    "parse_adapter_set",
    "parse_seeds",
    "read_metadata",
    "spec_uri",
]
